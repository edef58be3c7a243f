"""Reusing an identical earlier run instead of retraining.

Training is deterministic, so a run whose every input is identical to an earlier run's (same
images, labels and splits, same backbone weights, same settings, same headstart version) would
reproduce it exactly; such a run is not recomputed. The training key hashes those
inputs; an index in the cache maps each key to the run directory that holds its result.
Where that run is a version in the registry the new run writes to, it stands for the new run
itself (a nightly retrain on unchanged data adds no version); a run kept under another artifacts
root is copied into this one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from headstart import __version__
from headstart.config import TrainConfig
from headstart.infra.cache_files import read_or_drop
from headstart.infra.object_store import local_copy
from headstart.infra.storage import write_json_atomic
from headstart.registry.runs import Run


def training_key(config: TrainConfig, manifest_fingerprint: str, backbone_fingerprint: str) -> str:
    """Hashes everything that decides a run's model and metrics (see TrainConfig.counted_by_value)."""
    decisive = {
        "manifest": manifest_fingerprint,
        "backbone": backbone_fingerprint,
        "headstart": __version__,
        **config.training_values(),
    }
    return hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()[:20]


def _index_entry(cache_dir: Path, key: str) -> Path:
    # The index is this machine's: with a cache on a store, it lies in this machine's copy.
    return local_copy(cache_dir) / "runs" / f"{key}.json"


def record_run(cache_dir: Path, key: str, run_dir: Path) -> None:
    """Adds a run directory to those that hold the key's result (one per artifacts root, at most)."""
    held = [path for path in _recorded(cache_dir, key) if Path(path).resolve().parent != Path(run_dir).resolve().parent]
    write_json_atomic(_index_entry(cache_dir, key), {"run_dirs": [*held, str(run_dir)]})


def _recorded(cache_dir: Path, key: str) -> list[str]:
    """The run directories the index holds for the key; none where its entry is damaged (then dropped)."""
    recorded = read_or_drop(
        _index_entry(cache_dir, key), _read_index_entry, "reuse index entry", "treated as no earlier run"
    )
    return recorded or []


def _read_index_entry(path: Path) -> list[str]:
    recorded = json.loads(path.read_bytes())
    if not isinstance(recorded, dict):
        raise ValueError(f"a JSON {type(recorded).__name__}, not an object")
    # An index written before it kept one run per root holds "run_dir".
    run_dirs = recorded["run_dirs"] if "run_dirs" in recorded else [recorded.get("run_dir")]
    if not isinstance(run_dirs, list) or not run_dirs or not all(isinstance(p, str) and p for p in run_dirs):
        raise ValueError("no list of run directories")
    return run_dirs


def find_identical_run(cache_dir: Path, key: str, artifacts_root: Path | None = None) -> Path | None:
    """An earlier, complete run with the same training key, if one is still on disk: the one under
    `artifacts_root` where there is one, so that a run copied there is not copied again."""
    runs = [
        run
        for run in (Run.if_complete(Path(path)) for path in _recorded(cache_dir, key))
        if run is not None and run.config.get("training_key") == key
    ]
    here = [run for run in runs if artifacts_root is not None and in_registry(artifacts_root, run.path)]
    chosen = here or runs
    return chosen[0].path if chosen else None


def in_registry(artifacts_root: Path | str, run_dir: Path) -> bool:
    """Whether the run directory is a version of the registry under `artifacts_root` (of this
    machine's copy of it, for a registry on a store)."""
    return Path(run_dir).resolve().parent == local_copy(artifacts_root).resolve()
