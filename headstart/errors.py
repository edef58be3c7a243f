"""The one exception type for mistakes a user can fix: bad arguments, bad data, bad files; and the
file-system failures a user can fix too (a full disk, a read-only mount, a file where a folder
belongs, missing permissions), turned into one line at the command's boundary."""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import PurePath


class HeadstartError(Exception):
    """A user-facing error whose message is a single line that says what to fix."""


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line, or its type's name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# What went wrong and what to do, per errno a user can put right; any other OSError (a missing
# file headstart itself should have created, say) is a bug and keeps its traceback.
_FILE_SYSTEM_FAULTS = {
    errno.ENOSPC: ("no space left on the device", "free some space there or choose a place on another disk"),
    errno.EDQUOT: ("disk quota exceeded", "free some space there or choose a place on another disk"),
    errno.EROFS: ("the file system is read-only", "choose a writable place"),
    errno.ENOTDIR: ("a file stands where a folder is needed", "move the file away or choose another place"),
    errno.EISDIR: ("a folder stands where a file is needed", "move the folder away or choose another file"),
    errno.EACCES: ("permission denied", "give this user access or choose another place"),
    errno.EPERM: ("operation not permitted", "give this user access or choose another place"),
}


def file_system_fault(error: BaseException) -> HeadstartError | None:
    """The one-line error for a file-system failure a user can put right (see _FILE_SYSTEM_FAULTS),
    naming its place; None for any other exception. A HeadstartError is returned as it is."""
    if isinstance(error, HeadstartError):
        return error
    if isinstance(error, shutil.Error):
        code, paths = _copy_fault(error)
    elif isinstance(error, OSError):
        code, paths = error.errno, [error.filename, error.filename2]
    else:
        code, paths = _tensorflow_fault(error)
    if code not in _FILE_SYSTEM_FAULTS:
        return None
    what, advice = _FILE_SYSTEM_FAULTS[code]
    where = " → ".join(_place(os.fsdecode(path)) for path in paths if path is not None)
    return HeadstartError(f"{where or 'a file'}: {what}; {advice}")


# TensorFlow's file errors carry no errno, only "<path>; <strerror>" in their message.
_TENSORFLOW_FAULT = re.compile(
    r"(?P<path>[^\s;{}]+); (?P<reason>" + "|".join(re.escape(os.strerror(code)) for code in _FILE_SYSTEM_FAULTS) + ")"
)


def _copy_fault(error: shutil.Error) -> tuple[int | None, list]:
    """A copied tree's failure (shutil.copytree collects one per file, the errno only in its text):
    the first one's errno and destination."""
    failures = error.args[0] if error.args and isinstance(error.args[0], list) else []
    for failure in failures:
        if isinstance(failure, tuple) and len(failure) == 3:
            found = re.match(r"\[Errno (\d+)\]", str(failure[2]))
            if found is not None and int(found[1]) in _FILE_SYSTEM_FAULTS:
                return int(found[1]), [failure[1]]
    return None, []


def _tensorflow_fault(error: BaseException) -> tuple[int | None, list]:
    if not type(error).__module__.startswith("tensorflow"):
        return None, []
    found = _TENSORFLOW_FAULT.search(str(error))
    if found is None:
        return None, []
    code = next(code for code in _FILE_SYSTEM_FAULTS if os.strerror(code) == found["reason"])
    return code, [found["path"]]


def _place(path: str) -> str:
    """The path a user knows: a temporary file or staging folder headstart writes on the way
    (`.NAME.*.tmp`, `.NAME.partial`, `.export-*`, TensorFlow's `*_temp`) stands for the folder it is in."""
    parts = PurePath(path).parts
    for index, part in enumerate(parts):
        if (part.startswith(".") and part.endswith((".tmp", ".partial"))) or part.startswith(".export-"):
            return str(PurePath(*parts[:index])) if index else path
    return path
