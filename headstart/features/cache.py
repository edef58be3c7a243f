"""The content-addressed feature cache: per-image features in Parquet shards.

Shards are keyed by image content hash, backbone fingerprint and image size: a re-run
recomputes only images it has never seen, and a run that is interrupted keeps every shard it
finished (each is written to a temporary file and renamed). A shard damaged on disk (truncated,
bytes flipped: its Parquet page checksums no longer match) is dropped when the cache is read,
and its images are extracted again; it is never used.
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
from headstart.infra.cache_files import read_or_drop
from headstart.infra.storage import write_parquet_atomic

# A shard to extract: (content hash, path) of each of its images.
Shard = list[tuple[str, str]]


class FeatureCache:
    """Per-image features in Parquet shards under cache_dir/features/<fingerprint>-<size>px/."""

    # How each value is stored: float32 features; a cache of something else may store less.
    VALUE_DTYPE = "<f4"

    def __init__(self, cache_dir: Path, backbone: Backbone):
        self.directory = Path(cache_dir) / "features" / f"{backbone.fingerprint}-{backbone.image_size}px"

    def shard_paths(self) -> list[Path]:
        return sorted(self.directory.glob("shard-*.parquet")) if self.directory.exists() else []

    def cached_hashes(self) -> set[str]:
        """Every image hash with cached features, in shards that read back intact (damaged ones are dropped)."""
        hashes = set()
        for shard in self.shard_paths():
            table = self.read_shard(shard)
            if table is not None:
                hashes.update(table.column("sha256").to_pylist())
        return hashes

    def read_shard(self, path: Path) -> pa.Table | None:
        """A shard's table, its page checksums verified; None, with the shard deleted, where it is damaged."""
        return read_or_drop(path, _read_shard, "feature cache shard", "its images are extracted again")

    def write_shard(self, hashes: list[str], features: np.ndarray) -> Path:
        name = hashlib.sha256("".join(hashes).encode()).hexdigest()[:16]
        table = pa.table({"sha256": hashes, "features": features_column(features, self.VALUE_DTYPE)})
        return write_parquet_atomic(self.directory / f"shard-{name}.parquet", table, **FEATURES_PARQUET_OPTIONS)


def _read_shard(path: Path) -> pa.Table:
    table = pq.read_table(path, page_checksum_verification=True)
    if table.column_names != ["sha256", "features"]:
        raise ValueError(f"columns {table.column_names}")
    return table


def missing_shards(manifest: Manifest, cache: FeatureCache, shard_size: int = 1024) -> list[Shard]:
    """The manifest's images without cached features, as shards to extract independently."""
    table = manifest.read()
    cached = cache.cached_hashes()
    # A manifest holds each content hash once (duplicates are skipped when it is built).
    missing = [
        (sha, path)
        for sha, path in zip(table.column("sha256").to_pylist(), table.column("path").to_pylist())
        if sha not in cached
    ]
    return [missing[start : start + shard_size] for start in range(0, len(missing), shard_size)]
