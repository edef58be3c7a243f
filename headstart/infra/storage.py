"""Files: atomic writes (a crash leaves either the old file or the new one, never half of one) and content hashes."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from headstart.errors import HeadstartError, file_system_fault


@contextmanager
def atomic_path(destination: Path):
    """Yields a temporary path beside `destination`; renames it into place only on success."""
    destination = Path(destination)
    temporary = None
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(
            prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent
        )  # see temporary_pattern
        # mkstemp makes the file its owner's alone; the finished file gets the mode any new file
        # would, so that runs and caches written by a worker's account can be read by the team.
        os.fchmod(handle, 0o666 & ~_umask())
        os.close(handle)
        yield Path(temporary)
        os.replace(temporary, destination)
    except BaseException as error:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        # A failed write() names no file, and the temporary's name means nothing to a user.
        if isinstance(error, OSError) and error.errno is not None and error.filename in (None, temporary):
            error.filename = str(destination)
        raise


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    """This process's umask, read without setting it (os.umask would change it for every thread)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def check_writable_folder(folder: Path, option: str) -> Path:
    """Makes sure `folder` is, or can be created as, a folder this process can write in, before
    any work that would end by writing there; otherwise one line naming it and `option`. Creates
    nothing: a missing folder is judged by the nearest folder above it that exists."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and not existing.is_symlink() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file, not a folder" if existing == folder else f"cannot be created: {existing} is a file"
        raise HeadstartError(f"{option} {folder} {what}: give a folder (one is created if missing)")
    try:
        # Permission bits do not tell (root ignores them, a read-only mount keeps them): a write does.
        handle, probe = tempfile.mkstemp(prefix=".write-check.", suffix=".tmp", dir=existing)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        if error.errno is not None and (error.filename is None or ".write-check." in str(error.filename)):
            error.filename = str(existing)  # the probe's name means nothing to a user
        fault = file_system_fault(error)
        if fault is None:
            raise
        raise HeadstartError(f"{option} {folder}: {fault}") from None
    return folder


def temporary_pattern(destination: Path) -> str:
    """The names `atomic_path` gives the temporary files of `destination`, as a glob pattern."""
    return f".{Path(destination).name}.*.tmp"


# A writer that has changed nothing in its temporary file or folder for this long is dead: a live
# download or unpacking writes far more often (a stalled read gives up after a minute or so).
STALE_AFTER_SECONDS = 3600.0


def remove_stale_temporaries(directory: Path, pattern: str, older_than: float = STALE_AFTER_SECONDS) -> list[Path]:
    """Removes the temporary files or folders matching `pattern` in `directory` that a killed
    writer left behind: those in which nothing has changed for `older_than` seconds. Returns them."""
    removed = []
    now = time.time()
    for path in Path(directory).glob(pattern) if Path(directory).is_dir() else []:
        try:
            entries = [path, *path.rglob("*")] if path.is_dir() else [path]
            newest = max(entry.lstat().st_mtime for entry in entries)
        except OSError:  # removed meanwhile by its writer or another cleaner
            continue
        if now - newest > older_than:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def write_bytes_atomic(destination: Path, data: bytes) -> Path:
    with atomic_path(destination) as temporary:
        temporary.write_bytes(data)
    return Path(destination)


def write_json_atomic(destination: Path, value) -> Path:
    return write_bytes_atomic(destination, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


def write_parquet_atomic(destination: Path, table: pa.Table, **options) -> Path:
    with atomic_path(destination) as temporary:
        pq.write_table(table, temporary, **options)
    return Path(destination)


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """The file's hex digest by hashlib's `algorithm`, read in blocks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    return file_digest(path, "sha256")
