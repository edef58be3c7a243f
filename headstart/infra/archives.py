"""Unpacking tar archives from elsewhere: every member is checked before anything is written.

Refused: absolute names, names with a '..' component, anything but regular files, directories
and links, links whose target lies outside the destination, and archives that would unpack to
more than the disk has free. Python's 'data' extraction filter then applies the same rules once
more while writing, which also covers what a check of names alone cannot see (a link through a
link).
"""

from __future__ import annotations

import posixpath
import shutil
import tarfile
from pathlib import Path

from headstart.errors import HeadstartError, first_line

_DEVICE_KINDS = {tarfile.CHRTYPE: "a character device", tarfile.BLKTYPE: "a block device", tarfile.FIFOTYPE: "a FIFO"}


def unpack_tar(archive: Path, destination: Path) -> None:
    """Unpacks a .tar or .tar.gz into destination, which must not exist yet (its parent must); on
    any refusal or error nothing is left at destination."""
    destination = Path(destination)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(member)
            unpacked_bytes = sum(member.size for member in members if member.isfile())
            free_bytes = shutil.disk_usage(destination.parent).free
            if unpacked_bytes > free_bytes:  # a small archive of zeros can unpack to more than the disk holds
                raise HeadstartError(
                    f"the archive unpacks to {unpacked_bytes} bytes, "
                    f"more than the {free_bytes} free in {destination.parent}"
                )
            destination.mkdir(parents=True)
            try:
                tar.extractall(destination, members=members, filter="data")
            except BaseException:
                shutil.rmtree(destination, ignore_errors=True)
                raise
    except tarfile.FilterError as error:
        raise HeadstartError(f"archive member {error.tarinfo.name!r} was refused: {first_line(error)}") from None
    except (tarfile.TarError, EOFError, OSError) as error:
        raise HeadstartError(f"not a readable tar archive ({first_line(error)})") from None


def _check_member(member: tarfile.TarInfo) -> None:
    name = member.name
    if name.startswith("/"):
        raise HeadstartError(f"archive member {name!r} has an absolute path")
    if ".." in name.split("/"):
        raise HeadstartError(f"archive member {name!r} has a '..' component")
    if member.type in _DEVICE_KINDS:
        raise HeadstartError(f"archive member {name!r} is {_DEVICE_KINDS[member.type]}")
    if member.issym() or member.islnk():
        # A symlink's target is relative to its own folder, a hard link's to the archive's root.
        start = posixpath.dirname(name) if member.issym() else ""
        target = posixpath.normpath(posixpath.join(start, member.linkname))
        if member.linkname.startswith("/") or target == ".." or target.startswith("../"):
            kind = "a symlink" if member.issym() else "a hard link"
            raise HeadstartError(f"archive member {name!r} is {kind} to {member.linkname!r}, outside the destination")
    elif not (member.isfile() or member.isdir()):
        raise HeadstartError(f"archive member {name!r} has an unsupported type {member.type!r}")
