"""The frozen forward pass, run once per image and cached by content.

Images stream through decode → resize → backbone in batches, so memory stays bounded whatever
the dataset size. Features are cached in Parquet shards keyed by image content hash, backbone
fingerprint and image size: a re-run recomputes only images it has never seen, and a run that
is interrupted keeps every shard it finished.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from headstart.backbone import Backbone
from headstart.data import Manifest
from headstart.storage import write_parquet_atomic


# --- the content-addressed cache -----------------------------------------------------------------

class FeatureCache:
    """Per-image features in Parquet shards under cache_dir/features/<fingerprint>-<size>px/."""

    def __init__(self, cache_dir: Path, backbone: Backbone):
        self.directory = Path(cache_dir) / "features" / f"{backbone.fingerprint}-{backbone.image_size}px"

    def shard_paths(self) -> list[Path]:
        return sorted(self.directory.glob("shard-*.parquet")) if self.directory.exists() else []

    def lookup(self, wanted: set[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        for shard in self.shard_paths():
            table = pq.read_table(shard)
            hashes = table.column("sha256").to_pylist()
            if not wanted.intersection(hashes):
                continue
            matrix = _features_matrix(table)
            for row, sha256 in enumerate(hashes):
                if sha256 in wanted:
                    found[sha256] = matrix[row]
        return found

    def write_shard(self, hashes: list[str], features: np.ndarray) -> Path:
        name = hashlib.sha256("".join(hashes).encode()).hexdigest()[:16]
        table = pa.table({"sha256": hashes, "features": _features_column(features)})
        return write_parquet_atomic(self.directory / f"shard-{name}.parquet", table)


def _features_column(features: np.ndarray) -> pa.Array:
    features = np.ascontiguousarray(features, np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1)), features.shape[1])


def _features_matrix(table: pa.Table) -> np.ndarray:
    column = table.column("features").combine_chunks()
    return column.values.to_numpy(zero_copy_only=False).reshape(len(column), column.type.list_size)


@dataclass(frozen=True)
class FeatureSet:
    """A handle to one dataset's features file, what the training and evaluation tasks read."""

    path: Path
    extracted: int
    reused: int
    engine: str

    def load(self, split: str | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
        table = pq.read_table(self.path)
        if split is not None:
            table = table.filter(pc.equal(table.column("split"), split))
        return _features_matrix(table), table.column("label").to_numpy(), table.column("path").to_pylist()


def extract_features(
    manifest: Manifest,
    backbone: Backbone,
    cache_dir: Path,
    engine: str = "auto",
    threads: int | None = None,
    batch_size: int = 64,
    shard_size: int = 1024,
    show_progress: bool = False,
) -> FeatureSet:
    """Makes sure every image of the manifest has cached features; writes the dataset's features file."""
    destination = Path(cache_dir) / "datasets" / f"{manifest.fingerprint}-{backbone.fingerprint}-{backbone.image_size}px.parquet"
    table = manifest.read()
    hashes = table.column("sha256").to_pylist()
    if destination.exists():
        return FeatureSet(destination, extracted=0, reused=len(hashes), engine="cache")
    cache = FeatureCache(cache_dir, backbone)
    found = cache.lookup(set(hashes))
    missing = [(sha, path) for sha, path in zip(hashes, table.column("path").to_pylist()) if sha not in found]
    engine_name = "cache"
    if missing:
        from headstart.engines import choose_engine, image_batches

        choice = choose_engine(backbone, engine, cache_dir, threads, batch_size)
        engine_name = choice.engine.name
        progress = tqdm(total=len(missing), desc=f"extract features ({engine_name})", unit="img", disable=not show_progress)
        for start in range(0, len(missing), shard_size):
            chunk = missing[start:start + shard_size]
            outputs = []
            for batch in image_batches([path for _, path in chunk], backbone.image_size, batch_size, threads):
                outputs.append(choice.engine(batch))
                progress.update(len(batch))
            features = np.concatenate(outputs)
            cache.write_shard([sha for sha, _ in chunk], features)
            found.update(zip((sha for sha, _ in chunk), features))
        progress.close()
    matrix = np.stack([found[sha] for sha in hashes])
    dataset = table.append_column("features", _features_column(matrix))
    write_parquet_atomic(destination, dataset)
    return FeatureSet(destination, extracted=len(missing), reused=len(hashes) - len(missing), engine=engine_name)
