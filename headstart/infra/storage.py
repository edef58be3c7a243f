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

from headstart.errors import HeadstartError


@contextmanager
def atomic_path(destination: Path):
    """Yields a temporary path beside `destination`; renames it into place only on success."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(
        prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent
    )  # see temporary_pattern
    # mkstemp makes the file its owner's alone; the finished file gets the mode any new file
    # would, so that runs and caches written by a worker's account can be read by the team.
    os.fchmod(handle, 0o666 & ~_umask())
    os.close(handle)
    try:
        with writing_under(destination):
            yield Path(temporary)
            os.replace(temporary, destination)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@contextmanager
def writing_under(place: Path):
    """A write that fails on a full disk names no file; its error names `place` instead, for the
    one line a user sees (headstart.errors.file_system_fault)."""
    try:
        yield
    except OSError as error:
        if error.filename is None and error.errno is not None:
            raise OSError(error.errno, os.strerror(error.errno), str(place)) from error
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


def check_writable_directory(path: Path, option: str) -> None:
    """Stops, in one line naming `option` and the path, unless `path` is a folder this process
    can write in, or can be created as one: a file standing in its place or in its parent
    chain, or a read-only or forbidden place, would otherwise be found only when the first
    file is written there, after the work that made it."""
    path = Path(path)
    existing = path
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise HeadstartError(f"{option} {path}: {existing} is not a folder; move it away or choose another place")
    if not os.access(existing, os.W_OK | os.X_OK):
        why = "on a read-only file system" if _read_only(existing) else "not writable by this user"
        raise HeadstartError(f"{option} {path}: {existing} is {why}; choose a writable place")


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False
