"""Cached and derived files, checked when read: a damaged one is dropped, with one warning naming
it, and its caller rebuilds it from its sources, so that a damaged cache costs time, never a run.

A cache file is damaged when it no longer reads back as its writer left it: truncated, bytes
overwritten, emptied, or replaced by a well-formed file of another shape. Every writer here
writes atomically (headstart.infra.storage), so a file that fails its check was damaged after
it was written, and nothing in it can be trusted.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, TypeVar

from headstart.errors import first_line

logger = logging.getLogger("headstart")
T = TypeVar("T")


def read_or_drop(
    path: Path, read: Callable[[Path], T], what: str, rebuilt: str, companions: Iterable[Path] = ()
) -> T | None:
    """`read(path)`, which raises where the file fails its check; None where the file is absent,
    or damaged: then it is deleted (with `companions`, files derived with it) after one warning
    naming it, `what` it is and how it is `rebuilt`.

    A file that cannot be read for want of permission is not damaged: that error is raised."""
    path = Path(path)
    try:
        before = os.stat(path)
    except FileNotFoundError:
        return None
    try:
        return read(path)
    except FileNotFoundError:  # removed meanwhile: by another run that found it damaged too
        return None
    except PermissionError:
        raise
    except Exception as error:  # readers report damage in many types (ArrowInvalid, ValueError, KeyError…)
        drop_damaged(path, what, first_line(error), rebuilt, companions, before)
        return None


def drop_damaged(
    path: Path,
    what: str,
    reason: str,
    rebuilt: str,
    companions: Iterable[Path] = (),
    seen: os.stat_result | None = None,
) -> None:
    """Deletes a damaged file or folder (and its `companions`) after one warning naming it.

    Where `seen` is given, the path is deleted only while it is still what was checked: another
    run that dropped it already may have written its replacement meanwhile."""
    logger.warning("%s %s is damaged (%s); dropped, %s", what, path, reason, rebuilt)
    path = Path(path)
    if seen is not None:
        try:
            now = os.stat(path)
        except FileNotFoundError:
            now = None
        if now is None or (now.st_ino, now.st_mtime_ns, now.st_size) != (seen.st_ino, seen.st_mtime_ns, seen.st_size):
            return
    for target in (path, *map(Path, companions)):
        _remove(target)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        # Renamed out of the way first, so that no reader ever sees a folder half deleted.
        aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.dropped-", suffix=".tmp", dir=path.parent))
        try:
            path.rename(aside / path.name)
        except FileNotFoundError:
            pass
        shutil.rmtree(aside, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
