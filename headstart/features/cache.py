"""The content-addressed feature cache: per-image features in Parquet shards.

Shards are keyed by image content hash, backbone fingerprint and image size: a re-run
recomputes only images it has never seen, and a run that is interrupted keeps every shard it
finished (each is written to a temporary file and renamed).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from headstart.backbone.handles import Backbone
from headstart.data.manifest import Manifest
from headstart.features.encoding import FEATURES_PARQUET_OPTIONS, features_column
from headstart.storage import write_parquet_atomic

# A shard to extract: (content hash, path) of each of its images.
Shard = list[tuple[str, str]]


class FeatureCache:
    """Per-image features in Parquet shards under cache_dir/features/<fingerprint>-<size>px/."""

    def __init__(self, cache_dir: Path, backbone: Backbone):
        self.directory = Path(cache_dir) / "features" / f"{backbone.fingerprint}-{backbone.image_size}px"

    def shard_paths(self) -> list[Path]:
        return sorted(self.directory.glob("shard-*.parquet")) if self.directory.exists() else []

    def cached_hashes(self) -> set[str]:
        """Every image hash with cached features (reads only the hash column of each shard)."""
        return {sha for shard in self.shard_paths() for sha in pq.read_table(shard, columns=["sha256"]).column("sha256").to_pylist()}

    def write_shard(self, hashes: list[str], features: np.ndarray) -> Path:
        name = hashlib.sha256("".join(hashes).encode()).hexdigest()[:16]
        table = pa.table({"sha256": hashes, "features": features_column(features)})
        return write_parquet_atomic(self.directory / f"shard-{name}.parquet", table, **FEATURES_PARQUET_OPTIONS)


def missing_shards(manifest: Manifest, cache: FeatureCache, shard_size: int = 1024) -> list[Shard]:
    """The manifest's images without cached features, as shards to extract independently."""
    table = manifest.read()
    cached = cache.cached_hashes()
    # A manifest holds each content hash once (duplicates are skipped when it is built).
    missing = [(sha, path) for sha, path in zip(table.column("sha256").to_pylist(), table.column("path").to_pylist()) if sha not in cached]
    return [missing[start:start + shard_size] for start in range(0, len(missing), shard_size)]
