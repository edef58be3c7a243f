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

    def cached_hashes(self) -> set[str]:
        """Every image hash with cached features (reads only the hash column of each shard)."""
        return {sha for shard in self.shard_paths() for sha in pq.read_table(shard, columns=["sha256"]).column("sha256").to_pylist()}

    def gather(self, hashes: list[str]) -> np.ndarray:
        """The features of `hashes`, in order, read one shard at a time into one preallocated matrix."""
        row_of = {sha: row for row, sha in enumerate(hashes)}
        matrix, filled = None, 0
        for shard in self.shard_paths():
            table = pq.read_table(shard)
            rows = [(row_of[sha], index) for index, sha in enumerate(table.column("sha256").to_pylist()) if sha in row_of]
            if not rows:
                continue
            features = _features_matrix(table)
            if matrix is None:
                matrix = np.empty((len(hashes), features.shape[1]), np.float32)
            targets, sources = zip(*rows)
            matrix[list(targets)] = features[list(sources)]
            filled += len(rows)
        if matrix is None or filled < len(hashes):
            raise RuntimeError(f"feature cache {self.directory} lacks {len(hashes) - filled} of {len(hashes)} images")
        return matrix

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
        table = pq.read_table(self.path, filters=None if split is None else [("split", "=", split)])
        return _features_matrix(table), table.column("label").to_numpy(), table.column("path").to_pylist()


@dataclass(frozen=True)
class ExtractionSettings:
    """How the forward pass runs: engine, threads, batch size. Small, so it travels to workers."""

    engine: str = "auto"
    threads: int | None = None
    batch_size: int = 64


def dataset_features_path(manifest: Manifest, backbone: Backbone, cache_dir: Path) -> Path:
    return Path(cache_dir) / "datasets" / f"{manifest.fingerprint}-{backbone.fingerprint}-{backbone.image_size}px.parquet"


def plan_extraction(manifest: Manifest, backbone: Backbone, cache_dir: Path, shard_size: int = 1024) -> list[list[tuple[str, str]]]:
    """The images without cached features, as shards of (sha256, path) to extract independently."""
    if dataset_features_path(manifest, backbone, cache_dir).exists():
        return []
    table = manifest.read()
    cached = FeatureCache(cache_dir, backbone).cached_hashes()
    # A manifest holds each content hash once (duplicates are skipped when it is built).
    missing = [(sha, path) for sha, path in zip(table.column("sha256").to_pylist(), table.column("path").to_pylist()) if sha not in cached]
    return [missing[start:start + shard_size] for start in range(0, len(missing), shard_size)]


def extract_shard(shard: list[tuple[str, str]], backbone: Backbone, cache_dir: Path, settings: ExtractionSettings, progress=None) -> str:
    """Runs the backbone over one shard's images and caches their features; returns the engine's name.

    The engine is built once per process and reused for every later shard (see headstart.engines).
    """
    from headstart.engines import engine_for, image_batches

    engine = engine_for(backbone, settings.engine, Path(cache_dir), settings.threads)
    outputs = []
    for batch in image_batches([path for _, path in shard], backbone.image_size, settings.batch_size):
        outputs.append(engine(batch))
        if progress is not None:
            progress.update(len(batch))
    FeatureCache(cache_dir, backbone).write_shard([sha for sha, _ in shard], np.concatenate(outputs))
    return engine.name


def assemble_features(manifest: Manifest, backbone: Backbone, cache_dir: Path, extracted: int = 0, engine: str = "cache") -> FeatureSet:
    """Writes the dataset's features file (manifest columns + features) from the cache."""
    destination = dataset_features_path(manifest, backbone, cache_dir)
    table = manifest.read()
    if not destination.exists():
        features = FeatureCache(cache_dir, backbone).gather(table.column("sha256").to_pylist())
        write_parquet_atomic(destination, table.append_column("features", _features_column(features)))
    return FeatureSet(destination, extracted=extracted, reused=table.num_rows - extracted, engine=engine)


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
    """Makes sure every image of the manifest has cached features, in this process; returns the dataset's features."""
    shards = plan_extraction(manifest, backbone, cache_dir, shard_size)
    settings = ExtractionSettings(engine, threads, batch_size)
    engine_name = "cache"
    with tqdm(total=sum(map(len, shards)), desc="extract features", unit="img", disable=not show_progress or not shards) as progress:
        for shard in shards:
            engine_name = extract_shard(shard, backbone, cache_dir, settings, progress)
    return assemble_features(manifest, backbone, cache_dir, sum(map(len, shards)), engine_name)
