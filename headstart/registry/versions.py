"""The model registry: every committed run is a version; the `champion` alias names the one in use.

Under the artifacts root, each run directory is a version, named by its UTC creation time, and
immutable once committed; its lineage record (lineage.json) says where its model came from.
`registry/champion.json` holds the alias: the version it names and the history of every change,
with its reason, in one file that is replaced atomically (temp file + rename). A switch is made
only to a complete run, so the alias never names a missing or partial one.

A version is a name, never a path: one run directory directly inside the artifacts root. The alias
is checked against its schema whenever it is read; a damaged one is reported in one line, never
guessed at. A promotion decided against one champion (the gate's) is made only if that champion
is still in place under the registry's lock, so it never replaces a champion it was not compared
with. A run whose metadata is damaged is listed as damaged and cannot be promoted or used by name.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from headstart.config import is_url
from headstart.errors import HeadstartError
from headstart.infra.storage import write_json_atomic
from headstart.registry import published
from headstart.registry.runs import DamagedRun, Run

CHAMPION = "champion"


def alias_path(artifacts_root: Path) -> Path:
    return Path(artifacts_root) / "registry" / f"{CHAMPION}.json"


@dataclass(frozen=True)
class Version:
    """One row of `headstart models`; `damaged` says why a version cannot be used, None where it can."""

    version: str
    path: str
    accuracy: float | None
    n: int | None
    class_names: list[str]
    created_at: str
    champion: bool
    damaged: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def versions(artifacts_root: Path) -> list[Version]:
    """Every complete run under the artifacts root, newest first, the champion marked; a run whose
    metadata is damaged is listed as such, with the reason."""
    if is_url(artifacts_root):
        return _published_versions(artifacts_root)
    root = Path(artifacts_root)
    champion = champion_version(root)
    paths = (
        [path for path in root.iterdir() if path.is_dir() and not path.name.startswith(".")] if root.is_dir() else []
    )
    rows = []
    for path in sorted(paths, key=lambda path: path.name, reverse=True):
        try:
            run = Run.if_complete(path)
        except HeadstartError:  # a required file that is there but not what it should be
            run = None
        if run is None:
            continue
        try:
            run.check()
        except DamagedRun as damage:
            rows.append(
                Version(
                    path.name,
                    str(path),
                    None,
                    None,
                    [],
                    "",
                    path.name == champion,
                    f"{damage.path.name} {damage.problem}",
                )
            )
            continue
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


def _published_versions(root: str) -> list[Version]:
    """The versions of a registry in a store, from their markers alone (no run is downloaded)."""
    champion = champion_version(root)
    rows = []
    for name, marker in sorted(published.markers(root).items(), reverse=True):
        summary = marker.get("summary", {})
        rows.append(
            Version(
                version=name,
                path=f"{root}/{name}",
                accuracy=summary.get("accuracy"),
                n=summary.get("n"),
                class_names=summary.get("class_names", []),
                created_at=summary.get("created_at", ""),
                champion=name == champion,
            )
        )
    return rows


class _HistoryEntry(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    version: str
    previous: str | None
    reason: str
    by: str
    at: str
    rollback: bool = False


class _Alias(BaseModel):
    """What champion.json holds: the version named, and every change that led to it."""

    model_config = ConfigDict(strict=True, extra="forbid")

    version: str | None
    history: list[_HistoryEntry]


def _alias_problem(written) -> str | None:
    """What makes a champion alias unusable, or None."""
    if not isinstance(written, dict):
        return f"it holds a JSON {type(written).__name__}, not an object with version and history"
    try:
        alias = _Alias.model_validate(written)
    except ValidationError as error:
        first = error.errors()[0]
        return f"{'.'.join(map(str, first['loc'])) or 'the file'}: {first['msg']}"
    # Older entries may name paths (promotions once took them): history, which a rollback refuses to return to.
    if alias.version is not None and not is_version_name(alias.version):
        return f"{alias.version!r} is not a version name (a run directory's name inside the artifacts root)"
    if alias.version is None:
        return "it names no version but has a history" if alias.history else None
    if not alias.history or alias.history[-1].version != alias.version:
        return f"its version {alias.version} is not the one its history's last entry switched to"
    return None


WHAT_TO_DO_WITH_A_DAMAGED_ALIAS = (
    "restore it from a backup, or move it aside and promote a version (`headstart models promote VERSION`)"
)


def _read_alias(artifacts_root: Path | str) -> dict:
    if is_url(artifacts_root):
        data, _ = published.read_alias(artifacts_root)
        return _parsed_alias(data, published.alias_location(artifacts_root))
    path = alias_path(artifacts_root)
    if not path.exists():
        return _parsed_alias(None, path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise HeadstartError(
            f"the champion alias {path} cannot be read ({error.strerror or error}); {WHAT_TO_DO_WITH_A_DAMAGED_ALIAS}"
        ) from None
    return _parsed_alias(data, path)


def _parsed_alias(data: bytes | None, where) -> dict:
    """The alias a champion.json holds (None: no promotion yet), checked against its schema."""
    if data is None:
        return {"version": None, "history": []}
    try:
        written = json.loads(data)
    except ValueError:
        raise HeadstartError(
            f"the champion alias {where} is not valid JSON; {WHAT_TO_DO_WITH_A_DAMAGED_ALIAS}"
        ) from None
    problem = _alias_problem(written)
    if problem is not None:
        raise HeadstartError(f"the champion alias {where} is damaged ({problem}); {WHAT_TO_DO_WITH_A_DAMAGED_ALIAS}")
    return written


def is_version_name(name: str) -> bool:
    """Whether `name` can name a version: one directory name inside the artifacts root, neither
    hidden (runs being written are) nor a path."""
    return bool(name) and name not in (".", "..") and not name.startswith(".") and not any(c in name for c in "/\\\0")


def champion_version(artifacts_root: Path) -> str | None:
    """The version the champion alias names, or None before any promotion."""
    return _read_alias(artifacts_root)["version"]


def champion(artifacts_root: Path) -> Run | None:
    """The champion's run, or None before any promotion; HeadstartError where the alias is damaged,
    or names a run that is gone, incomplete, or whose metadata is damaged."""
    version = champion_version(artifacts_root)
    if version is None:
        return None
    root = artifacts_root if is_url(artifacts_root) else Path(artifacts_root)
    what_to_do = (
        "promote another version (`headstart models promote VERSION`) or roll back (`headstart models rollback`)"
    )
    try:
        run = _complete_run(root, version)
    except HeadstartError:
        run = None
    if run is None:
        raise HeadstartError(f"the champion {version} is no longer a complete run in {root}; {what_to_do}")
    try:
        run.check()
    except DamagedRun as damage:
        raise HeadstartError(
            f"the champion {version} is damaged ({damage.path.name} {damage.problem}); {what_to_do}"
        ) from None
    return run


def _complete_run(root: Path | str, version: str) -> Run | None:
    """The complete run named `version` directly under root (not through a link to elsewhere), or
    None; in a store, this machine's copy of the published version."""
    if not is_version_name(version):
        return None
    if is_url(root):
        path = published.fetch(root, version)
        return Run.if_complete(path) if path is not None else None
    path = root / version
    if path.is_symlink() or not path.is_dir():
        return None
    return Run.if_complete(path)


def history(artifacts_root: Path) -> list[dict]:
    """Every change of the champion alias, oldest first: version, previous, reason, by, at."""
    return _read_alias(artifacts_root)["history"]


class ChampionChanged(HeadstartError):
    """The champion is no longer the one a promotion was decided against."""

    def __init__(self, expected: str | None, current: str | None):
        self.expected, self.current = expected, current
        super().__init__(f"the champion is {current or 'none'} now, not {expected or 'none'}")


# `expected_champion` left out: the switch is made whoever the champion is.
ANY = object()


def promote(
    artifacts_root: Path, version: str, reason: str, by: str = "manual", expected_champion: str | None | object = ANY
) -> dict:
    """Makes `version` the champion; returns the history entry recorded with the switch. With
    `expected_champion` (None: no champion), the switch is made only if the champion is still that
    one when the registry's lock is held, else ChampionChanged: a decision taken against one
    champion never replaces another."""

    def switched(alias: dict) -> tuple[str, bool]:
        if expected_champion is not ANY and alias["version"] != expected_champion:
            raise ChampionChanged(expected_champion, alias["version"])
        return version, False

    return _switch(artifacts_root, switched, reason, by)


def rollback(artifacts_root: Path, reason: str = "rolled back", by: str = "manual") -> dict:
    """Makes the champion before the current one champion again; repeated, it walks further back."""

    def switched(alias: dict) -> tuple[str, bool]:
        lineage = _champion_lineage(alias["history"])
        if len(lineage) < 2:
            raise HeadstartError("there is no earlier champion to roll back to")
        return lineage[-2], True

    return _switch(artifacts_root, switched, reason, by)


def _switch(artifacts_root: Path | str, switched, reason: str, by: str) -> dict:
    """Switches the alias to the version `switched(alias now)` names (with whether that is a
    rollback); returns the history entry. A local registry holds its lock meanwhile; a store's
    alias is replaced only while no other machine has replaced it (read again, decided again
    where one has)."""
    if not is_url(artifacts_root):
        with _exclusive(artifacts_root):
            version, rollback = switched(_read_alias(Path(artifacts_root)))
            return _switch_holding_the_lock(artifacts_root, version, reason, by, rollback)
    entry: dict = {}
    checked: set[str] = set()

    def change(data: bytes | None) -> bytes:
        alias = _parsed_alias(data, published.alias_location(artifacts_root))
        version, rollback = switched(alias)
        if version not in checked:
            _usable_run(artifacts_root, version)
            checked.add(version)
        entry.clear()
        entry.update(_history_entry(alias, version, reason, by, rollback))
        new = {"version": version, "history": [*alias["history"], entry]}
        return (json.dumps(new, indent=2, sort_keys=True) + "\n").encode()

    published.switch_alias(artifacts_root, change)
    return dict(entry)


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


def _switch_holding_the_lock(artifacts_root: Path, version: str, reason: str, by: str, rollback: bool) -> dict:
    root = Path(artifacts_root)
    _usable_run(root, version)
    alias = _read_alias(root)
    entry = _history_entry(alias, version, reason, by, rollback)
    write_json_atomic(alias_path(root), {"version": version, "history": [*alias["history"], entry]})
    return entry


def _history_entry(alias: dict, version: str, reason: str, by: str, rollback: bool) -> dict:
    return {
        "version": version,
        "previous": alias["version"],
        "reason": reason,
        "by": by,
        "at": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        "rollback": rollback,
    }


def _usable_run(root: Path | str, version: str) -> Run:
    """The complete, undamaged run `version` names; else a one-line HeadstartError."""
    if not is_version_name(version):
        raise HeadstartError(
            f"{version!r} is not a complete run in {root}: a version is the name of a run directory "
            "inside it, as `headstart models` lists them"
        )
    try:
        run = _complete_run(root, version)
    except HeadstartError:
        run = None
    if run is None:
        raise HeadstartError(
            f"version {version} is not a complete run in {root}; `headstart models` lists the versions"
        )
    try:
        run.check()
    except DamagedRun as damage:
        raise HeadstartError(
            f"version {version} is damaged ({damage.path.name} {damage.problem}); promote another version"
        ) from None
    return run


def resolve(artifacts_root: Path, model: str) -> Run:
    """A model named as `champion`, a version under the artifacts root, or a run directory (a path
    the user gives explicitly)."""
    root = artifacts_root if is_url(artifacts_root) else Path(artifacts_root)
    if model == CHAMPION:
        run = champion(root)
        if run is None:
            raise HeadstartError(f"no champion in {root} yet; promote a version (`headstart models promote VERSION`)")
        return run
    if is_version_name(model) and (is_url(root) or (root / model).is_dir()):
        try:
            run = _complete_run(root, model)
        except HeadstartError:
            run = None
        if run is None:
            raise HeadstartError(
                f"version {model} is not a complete run in {root}; `headstart models` lists the versions"
            )
        run.check()
        return run
    if is_url(model):  # a version named by its URL, as a store's runs are shown
        store_root, _, version = model.rstrip("/").rpartition("/")
        return resolve(store_root, version)
    return Run(Path(model))
