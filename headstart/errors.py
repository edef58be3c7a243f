"""The one exception type for mistakes a user can fix: bad arguments, bad data, bad files."""

from __future__ import annotations

import errno
import os
from pathlib import Path


class HeadstartError(Exception):
    """A user-facing error whose message is a single line that says what to fix."""


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line, or its type's name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# What the file system refuses for reasons outside the program, and what the user can do about each.
_FILE_SYSTEM_FAULTS = {
    errno.ENOSPC: "no space left on the device holding {path}: free some space there, or give another place",
    errno.EDQUOT: "disk quota exceeded writing {path}: free some space there, or give another place",
    errno.EROFS: "{path} is on a read-only file system: give a writable place",
    errno.ENOTDIR: "{path}: part of this path is a file, not a folder: give a folder, or move the file away",
    errno.EACCES: "permission denied: {path}: give a place this user may write to, or change its permissions",
    errno.EPERM: "operation not permitted: {path}: give a place this user may write to, or change its permissions",
    errno.EISDIR: "{path} is a folder where a file is needed: give a file's path",
}


def file_system_fault(error: BaseException) -> HeadstartError | None:
    """The one-line error for an anticipated file-system failure (no space, read-only, not a
    folder, permission), naming the path; None for any other error, which stays a bug."""
    if not isinstance(error, OSError) or error.errno not in _FILE_SYSTEM_FAULTS:
        return None
    path = error.filename if error.filename is not None else "?"
    if isinstance(path, bytes):
        path = path.decode(errors="replace")
    message = _FILE_SYSTEM_FAULTS[error.errno].format(path=Path(path) if path != "?" else "a file")
    return HeadstartError(message)


def as_user_error(error: BaseException) -> HeadstartError | None:
    """The user-facing form of an error: itself where it is one, a file-system fault's one line,
    else None."""
    return error if isinstance(error, HeadstartError) else file_system_fault(error)


def with_path(error: OSError, path) -> OSError:
    """The error with `path` as its filename where the failing call did not say (a write())."""
    if error.filename is None:
        error.filename = str(path)
    return error


def os_error_at(error: BaseException, path) -> OSError | None:
    """An anticipated file-system failure that names no file (a failed write(), a copied tree,
    TensorFlow's own file code) as an OSError naming `path`; None for any other error and for
    one that names its file already."""
    import shutil

    if isinstance(error, OSError) and not isinstance(error, shutil.Error):
        if error.errno in _FILE_SYSTEM_FAULTS and error.filename is None:
            return OSError(error.errno, os.strerror(error.errno), str(path))
        return None
    # shutil.Error (a copied tree) and TensorFlow's errors keep the errno only in their text.
    if not isinstance(error, shutil.Error) and not type(error).__module__.startswith("tensorflow"):
        return None
    text = str(error)
    for number in _FILE_SYSTEM_FAULTS:
        if os.strerror(number) in text:
            return OSError(number, os.strerror(number), str(path))
    return None
