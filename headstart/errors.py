"""The one exception type for mistakes a user can fix: bad arguments, bad data, bad files; and the
file-system failures a user can fix too (a full disk, a read-only mount, a file where a folder
belongs, missing permissions), turned into one line at the command's boundary."""

from __future__ import annotations

import errno


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
    """The one-line error for an OSError a user can put right (see _FILE_SYSTEM_FAULTS), naming
    its path; None for any other exception. A HeadstartError is returned as it is."""
    if isinstance(error, HeadstartError):
        return error
    if not isinstance(error, OSError) or error.errno not in _FILE_SYSTEM_FAULTS:
        return None
    what, advice = _FILE_SYSTEM_FAULTS[error.errno]
    where = " → ".join(str(name) for name in (error.filename, error.filename2) if name is not None)
    return HeadstartError(f"{where or 'a file'}: {what}; {advice}")
