"""Runs and the champion alias in an object store, for a team whose machines share no disk.

A run is written and committed on the machine that trains it (headstart.registry.run_writer, in
this machine's copy of the store's folder), then published: an owner record first, every file,
and one marker, `<version>/PUBLISHED.json`, last. The marker lists every file with its size and
sha256: a reader trusts a version only when its marker is there, so a writer killed halfway
leaves nothing anyone sees, and the next writer on that registry removes what it left.

A reader copies a version into its own copy of the store's folder, file by file, each checked
against the marker; a version copied once is read from that copy, after one look at its marker.

The champion alias (`registry/champion.json`, the same JSON as a local registry's: the version
and every change) is replaced by a conditional write on its ETag: of two machines switching it at
once, one wins and the other reads the new alias and tries again, so no change is ever lost.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import socket
import time
from pathlib import Path
from typing import Callable

from headstart.errors import HeadstartError
from headstart.infra.object_store import ObjectStore, local_copy, machine_cache
from headstart.infra.storage import STALE_AFTER_SECONDS, file_sha256, write_bytes_atomic

MARKER = "PUBLISHED.json"
OWNER = ".owner"
ALIAS = "registry/champion.json"
# Where this machine keeps the marker each local copy of a version was checked against.
CHECKED_DIR = ".published"
# Tries at switching the alias before giving up: each lost race means another switch landed.
SWITCH_ATTEMPTS = 20


def store_of(run_dir: Path) -> str | None:
    """The store URL of the registry whose local copy holds `run_dir` (this machine's copy of
    `<url>/<version>`), or None for a run in a local registry."""
    copies = machine_cache() / "store"
    try:
        relative = Path(run_dir).resolve().relative_to(copies.resolve())
    except ValueError:
        return None
    scheme, *rest = relative.parent.parts
    return f"{scheme}://{'/'.join(rest)}" if rest else None


def _files(run_dir: Path) -> dict[str, dict]:
    return {
        path.relative_to(run_dir).as_posix(): {"size": path.stat().st_size, "sha256": file_sha256(path)}
        for path in sorted(Path(run_dir).rglob("*"))
        if path.is_file() and not path.name.startswith(".")
    }


def _summary(run_dir: Path) -> dict:
    """What `headstart models` lists of a version, kept in its marker so that a listing reads no run."""

    def read(name: str, default):
        try:
            return json.loads((Path(run_dir) / name).read_bytes())
        except (OSError, ValueError):
            return default

    metrics, lineage = read("metrics.json", {}), read("lineage.json", {})
    return {
        "accuracy": metrics.get("accuracy") if isinstance(metrics, dict) else None,
        "n": metrics.get("n") if isinstance(metrics, dict) else None,
        "class_names": read("class_names.json", []),
        "created_at": lineage.get("created_at", "") if isinstance(lineage, dict) else "",
    }


def publish(root: str, run_dir: Path) -> None:
    """Uploads a committed run to the store: its owner record, the files the store does not hold
    yet in this form, and its marker last."""
    store, version = ObjectStore(root), Path(run_dir).name
    previous = read_marker(store, version)
    held = previous["files"] if previous is not None else {}
    if previous is None:
        owner = f"{socket.gethostname()} {os.getpid()} {time.time():.0f}"
        store.write_bytes(f"{version}/{OWNER}", owner.encode())
    files = _files(run_dir)
    for relative, entry in files.items():
        if held.get(relative) != entry:
            store.upload(Path(run_dir) / relative, f"{version}/{relative}")
    folders = sorted(
        path.relative_to(run_dir).as_posix()
        for path in Path(run_dir).rglob("*")
        if path.is_dir() and not path.name.startswith(".")
    )
    marker = {"version": version, "files": files, "folders": folders, "summary": _summary(run_dir)}
    data = (json.dumps(marker, indent=2, sort_keys=True) + "\n").encode()
    store.write_bytes(f"{version}/{MARKER}", data)
    _note_checked(root, version, data)


def read_marker(store: ObjectStore, version: str) -> dict | None:
    data = store.read_bytes(f"{version}/{MARKER}")
    if data is None:
        return None
    try:
        marker = json.loads(data)
        if not isinstance(marker.get("files"), dict):
            raise ValueError("no files")
    except (ValueError, AttributeError):
        raise HeadstartError(
            f"{store.location(version)}/{MARKER} is damaged; publish the version again or remove it"
        ) from None
    return marker


def markers(root: str) -> dict[str, dict]:
    """Every published version of the store's registry: version → its marker."""
    store = ObjectStore(root)
    found = {}
    for name in store.children():
        if name.startswith(".") or name == "registry":
            continue
        marker = read_marker(store, name)
        if marker is not None:
            found[name] = marker
    return found


def fetch(root: str, version: str) -> Path | None:
    """This machine's copy of a published version, brought up to date with its marker (only the
    files missing or changed are downloaded, each checked); None where the version is not published."""
    store = ObjectStore(root)
    data = store.read_bytes(f"{version}/{MARKER}")
    if data is None:
        return None
    local = local_copy(root) / version
    checked = _checked_path(root, version)
    if checked.is_file() and checked.read_bytes() == data and local.is_dir():
        return local
    marker = read_marker(store, version)
    for folder in marker.get("folders", []):  # an empty one too: a run's layout is part of it
        (local / folder).mkdir(parents=True, exist_ok=True)
    for relative, entry in marker["files"].items():
        path = local / relative
        if path.is_file() and path.stat().st_size == entry["size"] and file_sha256(path) == entry["sha256"]:
            continue
        store.download(f"{version}/{relative}", path)
        if file_sha256(path) != entry["sha256"]:
            path.unlink(missing_ok=True)
            raise HeadstartError(
                f"{store.location(version)}/{relative} does not match its marker; publish the version again"
            )
    _note_checked(root, version, data)
    return local


def _checked_path(root: str, version: str) -> Path:
    return local_copy(root) / CHECKED_DIR / f"{version}.json"


def _note_checked(root: str, version: str, marker: bytes) -> None:
    write_bytes_atomic(_checked_path(root, version), marker)


def remove_abandoned(root: str, older_than: float = STALE_AFTER_SECONDS) -> list[str]:
    """Removes the versions a killed writer left unpublished (no marker): those whose owner ran
    on this host and runs no more, and those nobody has written to for `older_than` seconds."""
    store = ObjectStore(root)
    host, removed = socket.gethostname(), []
    for name in store.children():
        if name.startswith(".") or name == "registry" or store.exists(f"{name}/{MARKER}"):
            continue
        objects = store.listing(name)
        if not objects:
            continue
        owner = (store.read_bytes(f"{name}/{OWNER}") or b"").decode(errors="replace").split()
        dead_here = len(owner) >= 2 and owner[0] == host and owner[1].isdigit() and not _process_runs(int(owner[1]))
        newest = max((_modified(info) for info in objects.values()), default=time.time())
        if dead_here or time.time() - newest > older_than:
            if not store.exists(f"{name}/{MARKER}"):  # published meanwhile: not abandoned
                store.remove(name)
                removed.append(name)
    return removed


def _modified(info: dict) -> float:
    modified = info.get("LastModified") or info.get("mtime") or info.get("last_modified")
    if isinstance(modified, dt.datetime):
        return modified.timestamp()
    return float(modified) if isinstance(modified, (int, float)) else time.time()


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_alias(root: str) -> tuple[bytes | None, str | None]:
    """The alias's bytes and ETag; (None, None) before any promotion."""
    return ObjectStore(root).read_with_tag(ALIAS)


def alias_location(root: str) -> str:
    return ObjectStore(root).location(ALIAS)


def switch_alias(root: str, change: Callable[[bytes | None], bytes]) -> None:
    """Replaces the alias by `change(what it holds now)`, only while no other writer has replaced
    it since it was read; read again and changed again where one has. `change` may raise to
    refuse (the champion is no longer the one expected)."""
    store = ObjectStore(root)
    for attempt in range(SWITCH_ATTEMPTS):
        data, tag = store.read_with_tag(ALIAS)
        if store.replace_if(ALIAS, change(data), tag):
            return
        time.sleep(random.uniform(0.05, 0.2) * (attempt + 1))
    raise HeadstartError(
        f"{store.location(ALIAS)}: the champion changed {SWITCH_ATTEMPTS} times while switching it; try again"
    )
