"""Whether a data folder changed since it was last looked at, cheaply enough to ask every few
minutes: what `watch` and `headstart data changed` compare before telling anyone.

A folder's fingerprint is made of its classes and the content hashes of their image files (the
files `train` would list: root/CLASS/**/IMAGE). A file's hash is found without reading it where
its size and modification time are unchanged: in the folder's last look, else in the scan cache
that training keeps (headstart.data.manifest, keyed the same way). Only a file that is new or
rewritten is read, and hashed, never decoded. An unchanged folder therefore costs one directory
listing and one stat per file. Since the fingerprint is by content, a file touched, or copied in
again unchanged, or renamed within its class, changes nothing; a file added, removed, rewritten
or moved to another class does.

What a look found is recorded per folder in the cache directory (watch/<key>.json, written
atomically), under a lock, so that two looks at once (the schedule and a script) never both
report the same change, and the record survives restarts. It is recorded only once the caller
has done what it must with the change (sent the event): a look that fails records nothing, and
the next one finds the change again. The first look at a folder has nothing to compare with: it
records the folder and reports no change.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from headstart.data.folders import image_files
from headstart.data.manifest import cached_scans
from headstart.errors import HeadstartError
from headstart.infra.cache_files import read_or_drop
from headstart.infra.storage import file_sha256, write_json_atomic

STATE_VERSION = 1


@dataclass(frozen=True)
class DataChange:
    """One look at a folder, against the one before."""

    path: str  # absolute
    fingerprint: str
    previous: str | None  # the last look's fingerprint; None at the first look
    counts: dict[str, int]  # image files per class
    added: int = 0  # images (by content, per class) not there at the last look
    removed: int = 0  # images there at the last look and gone now
    looked_at: str = ""
    hashed: int = 0  # files read and hashed for this look (the rest were known)

    @property
    def first_look(self) -> bool:
        return self.previous is None

    @property
    def changed(self) -> bool:
        return self.previous is not None and self.previous != self.fingerprint

    def payload(self) -> dict:
        """What an event about this change carries."""
        return {
            "path": self.path,
            "fingerprint": self.fingerprint,
            "previous_fingerprint": self.previous,
            "counts": dict(self.counts),
            "images": sum(self.counts.values()),
            "added": self.added,
            "removed": self.removed,
        }

    def summary(self) -> str:
        images = f"{sum(self.counts.values())} images in {len(self.counts)} classes"
        if self.first_look:
            return f"first look at {self.path}: {images}, fingerprint {self.fingerprint} recorded"
        if not self.changed:
            return f"{self.path} unchanged since the last look ({images}, fingerprint {self.fingerprint})"
        return (
            f"{self.path} changed: {self.added} images added, {self.removed} removed ({images}; "
            f"fingerprint {self.previous} → {self.fingerprint})"
        )


@dataclass
class _Look:
    fingerprint: str
    counts: dict[str, int]
    entries: dict[str, list]  # path relative to the folder → [class, size, mtime_ns, sha256]
    hashed: int = 0
    contents: Counter = field(default_factory=Counter)  # (class, sha256) → how many files


def state_path(cache_dir: Path, root: Path) -> Path:
    """Where the looks at `root` are recorded: one file per folder, named by its absolute path."""
    key = hashlib.sha256(str(Path(root).absolute()).encode()).hexdigest()[:16]
    return Path(cache_dir) / "watch" / f"{key}.json"


def watched_folder(root: Path) -> Path:
    """The folder to look at, as an absolute path; one line where it is not there."""
    root = Path(root).absolute()
    if not root.is_dir():
        raise HeadstartError(f"data folder not found: {root} (give a folder of class sub-folders)")
    return root


@contextmanager
def looking_at(root: Path, cache_dir: Path) -> Iterator[DataChange]:
    """Looks at the folder and yields what changed since the last look; records this look when
    the block ends without an exception. Looks at one folder are taken one at a time."""
    root = watched_folder(root)
    place = state_path(cache_dir, root)
    place.parent.mkdir(parents=True, exist_ok=True)
    with open(place.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            previous = read_or_drop(place, _read_state, "the data folder's last look", "the next look records it anew")
            if previous is not None and previous["path"] != str(root):
                previous = None  # another folder whose key is the same: never compared with
            look = _look(root, cache_dir, previous["entries"] if previous else {})
            old = Counter() if previous is None else _contents(previous["entries"])
            change = DataChange(
                path=str(root),
                fingerprint=look.fingerprint,
                previous=None if previous is None else previous["fingerprint"],
                counts=look.counts,
                added=sum((look.contents - old).values()) if previous is not None else 0,
                removed=sum((old - look.contents).values()) if previous is not None else 0,
                looked_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                hashed=look.hashed,
            )
            yield change
            if previous is None or previous["fingerprint"] != look.fingerprint or previous["entries"] != look.entries:
                write_json_atomic(
                    place,
                    {
                        "version": STATE_VERSION,
                        "path": str(root),
                        "fingerprint": look.fingerprint,
                        "counts": look.counts,
                        "looked_at": change.looked_at,
                        "entries": look.entries,
                    },
                )
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read_state(path: Path) -> dict:
    state = json.loads(path.read_text())
    if state.get("version") != STATE_VERSION or not isinstance(state.get("entries"), dict):
        raise ValueError("not a record of a look written by this version")
    for entry in state["entries"].values():
        if not (isinstance(entry, list) and len(entry) == 4):
            raise ValueError("an entry that is not [class, size, mtime, hash]")
    return state


def _contents(entries: dict[str, list]) -> Counter:
    return Counter((entry[0], entry[3]) for entry in entries.values())


def _look(root: Path, cache_dir: Path, known: dict[str, list]) -> _Look:
    """The folder's classes and image files, each file's hash from `known` (the last look), the
    scan cache or, for a file new to both, from reading it."""
    class_names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    entries: dict[str, list] = {}
    counts: dict[str, int] = {}
    unknown: list[tuple[str, str, int, int]] = []
    for name in class_names:
        images, _ = image_files(root / name)
        counts[name] = 0
        for path in images:
            try:
                stat = os.stat(path)
            except OSError:  # gone since listed, or unreadable: not part of this look
                continue
            relative = str(path.relative_to(root))
            counts[name] += 1
            entry = known.get(relative)
            if entry is not None and entry[0] == name and entry[1:3] == [stat.st_size, stat.st_mtime_ns]:
                entries[relative] = entry
            else:
                unknown.append((relative, name, stat.st_size, stat.st_mtime_ns))
    hashed = 0
    if unknown:
        # The scan cache is read only when some file is not known from the last look.
        scanned = cached_scans(cache_dir)
        for relative, name, size, mtime_ns in unknown:
            path = root / relative
            cached = scanned.get((os.path.realpath(path), size, mtime_ns))
            if cached is not None:
                sha256 = cached[0]
            else:
                try:
                    sha256 = file_sha256(path)
                except OSError:
                    counts[name] -= 1
                    continue
                hashed += 1
            entries[relative] = [name, size, mtime_ns, sha256]
    contents = _contents(entries)
    digest = hashlib.sha256()
    for name, sha256 in sorted(contents.elements()):
        digest.update(f"{name}:{sha256};".encode())
    digest.update("|".join(class_names).encode())
    return _Look(digest.hexdigest()[:16], counts, dict(sorted(entries.items())), hashed, contents)
