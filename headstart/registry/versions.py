"""The model registry: every committed run is a version; the `champion` alias names the one in use.

Under the artifacts root, each run directory is a version, named by its UTC creation time, and
immutable once committed; its lineage record (lineage.json) says where its model came from.
`registry/champion.json` holds the alias: the version it names and the history of every change,
with its reason, in one file that is replaced atomically (temp file + rename). A switch is made
only to a complete run, so the alias never names a missing or partial one.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from headstart.errors import HeadstartError
from headstart.infra.storage import write_json_atomic
from headstart.registry.runs import Run

CHAMPION = "champion"


def alias_path(artifacts_root: Path) -> Path:
    return Path(artifacts_root) / "registry" / f"{CHAMPION}.json"


@dataclass(frozen=True)
class Version:
    """One row of `headstart models`."""

    version: str
    path: str
    accuracy: float | None
    n: int | None
    class_names: list[str]
    created_at: str
    champion: bool

    def to_dict(self) -> dict:
        return asdict(self)


def versions(artifacts_root: Path) -> list[Version]:
    """Every complete run under the artifacts root, newest first, the champion marked."""
    root = Path(artifacts_root)
    champion = champion_version(root)
    runs = (
        [Run.if_complete(path) for path in root.iterdir() if path.is_dir() and not path.name.startswith(".")]
        if root.is_dir()
        else []
    )
    rows = []
    for run in sorted((run for run in runs if run is not None), key=lambda run: run.path.name, reverse=True):
        metrics = run.metrics
        rows.append(
            Version(
                version=run.path.name,
                path=str(run.path),
                accuracy=metrics.get("accuracy"),
                n=metrics.get("n"),
                class_names=run.class_names,
                created_at=run.lineage.created_at if run.lineage is not None else "",
                champion=run.path.name == champion,
            )
        )
    return rows


def _read_alias(artifacts_root: Path) -> dict:
    path = alias_path(artifacts_root)
    if not path.is_file():
        return {"version": None, "history": []}
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise HeadstartError(
            f"the champion alias {path} is not valid JSON; restore it or delete it to start afresh"
        ) from None


def champion_version(artifacts_root: Path) -> str | None:
    """The version the champion alias names, or None before any promotion."""
    return _read_alias(artifacts_root)["version"]


def champion(artifacts_root: Path) -> Run | None:
    """The champion's run, or None before any promotion."""
    version = champion_version(artifacts_root)
    if version is None:
        return None
    run = Run.if_complete(Path(artifacts_root) / version)
    if run is None:
        raise HeadstartError(
            f"the champion {version} is no longer a complete run in {artifacts_root}; promote another version"
        )
    return run


def history(artifacts_root: Path) -> list[dict]:
    """Every change of the champion alias, oldest first: version, previous, reason, by, at."""
    return _read_alias(artifacts_root)["history"]


def promote(artifacts_root: Path, version: str, reason: str, by: str = "manual") -> dict:
    """Makes `version` the champion; returns the history entry recorded with the switch."""
    return _switch(artifacts_root, version, reason, by, rollback=False)


def rollback(artifacts_root: Path, reason: str = "rolled back", by: str = "manual") -> dict:
    """Makes the champion before the current one champion again; repeated, it walks further back."""
    with _exclusive(artifacts_root):
        lineage = _champion_lineage(_read_alias(Path(artifacts_root))["history"])
        if len(lineage) < 2:
            raise HeadstartError("there is no earlier champion to roll back to")
        return _switch_holding_the_lock(artifacts_root, lineage[-2], reason, by, rollback=True)


@contextmanager
def _exclusive(artifacts_root: Path):
    """Holds the registry's lock: two runs promoting at once would otherwise each read the
    history, append their entry and replace the file, and one of the entries would be lost."""
    lock = alias_path(artifacts_root).with_suffix(".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _champion_lineage(entries: list[dict]) -> list[str]:
    """The champions in the order they took over, each rollback undoing the latest takeover."""
    stack: list[str] = []
    for entry in entries:
        if entry.get("rollback"):
            stack.pop()
        else:
            stack.append(entry["version"])
    return stack


def _switch(artifacts_root: Path, version: str, reason: str, by: str, rollback: bool) -> dict:
    with _exclusive(artifacts_root):
        return _switch_holding_the_lock(artifacts_root, version, reason, by, rollback)


def _switch_holding_the_lock(artifacts_root: Path, version: str, reason: str, by: str, rollback: bool) -> dict:
    root = Path(artifacts_root)
    if Run.if_complete(root / version) is None:
        raise HeadstartError(
            f"version {version} is not a complete run in {root}; `headstart models` lists the versions"
        )
    alias = _read_alias(root)
    entry = {
        "version": version,
        "previous": alias["version"],
        "reason": reason,
        "by": by,
        "at": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        "rollback": rollback,
    }
    write_json_atomic(alias_path(root), {"version": version, "history": [*alias["history"], entry]})
    return entry


def resolve(artifacts_root: Path, model: str) -> Run:
    """A model named as `champion`, a version under the artifacts root, or a run directory."""
    if model == CHAMPION:
        run = champion(artifacts_root)
        if run is None:
            raise HeadstartError(
                f"no champion in {artifacts_root} yet; promote a version (`headstart models promote VERSION`)"
            )
        return run
    candidate = Path(artifacts_root) / model
    return Run(candidate if candidate.is_dir() and "/" not in model else Path(model))
