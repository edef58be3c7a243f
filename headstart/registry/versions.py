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

from headstart.errors import HeadstartError
from headstart.infra.storage import write_json_atomic
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


def _read_alias(artifacts_root: Path) -> dict:
    path = alias_path(artifacts_root)
    if not path.exists():
        return {"version": None, "history": []}
    what_to_do = "restore it from a backup, or move it aside and promote a version (`headstart models promote VERSION`)"
    try:
        written = json.loads(path.read_bytes())
    except OSError as error:
        raise HeadstartError(
            f"the champion alias {path} cannot be read ({error.strerror or error}); {what_to_do}"
        ) from None
    except ValueError:
        raise HeadstartError(f"the champion alias {path} is not valid JSON; {what_to_do}") from None
    problem = _alias_problem(written)
    if problem is not None:
        raise HeadstartError(f"the champion alias {path} is damaged ({problem}); {what_to_do}")
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
    root = Path(artifacts_root)
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


def _complete_run(root: Path, version: str) -> Run | None:
    """The complete run named `version` directly under root (not through a link to elsewhere), or None."""
    if not is_version_name(version):
        return None
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
    with _exclusive(artifacts_root):
        if expected_champion is not ANY:
            current = _read_alias(Path(artifacts_root))["version"]
            if current != expected_champion:
                raise ChampionChanged(expected_champion, current)
        return _switch_holding_the_lock(artifacts_root, version, reason, by, rollback=False)


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


def _switch_holding_the_lock(artifacts_root: Path, version: str, reason: str, by: str, rollback: bool) -> dict:
    root = Path(artifacts_root)
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
    """A model named as `champion`, a version under the artifacts root, or a run directory (a path
    the user gives explicitly)."""
    root = Path(artifacts_root)
    if model == CHAMPION:
        run = champion(root)
        if run is None:
            raise HeadstartError(f"no champion in {root} yet; promote a version (`headstart models promote VERSION`)")
        return run
    if is_version_name(model) and (root / model).is_dir():
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
    return Run(Path(model))
