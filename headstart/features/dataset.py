"""One dataset's features file: the manifest's columns and every image's features, from the cache.

Each row group holds one split's images of one content-hash bucket (≈ ROWS_PER_GROUP rows),
sorted by hash, so a split is read, or streamed, without touching the others, and the layout
depends only on the images, never on which shards the cache happens to hold.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from headstart.backbone.handles import Backbone
from headstart.config import Place
from headstart.data.manifest import SPLITS, Manifest
from headstart.features.cache import FeatureCache, Shard, missing_shards
from headstart.features.encoding import FEATURES_PARQUET_OPTIONS, as_binary_column, features_matrix
from headstart.features.streams import FeatureStream, damage_stops_the_run
from headstart.infra.cache_files import read_or_drop
from headstart.infra.object_store import local_copy
from headstart.infra.storage import atomic_path, remove_stale_temporaries

# Bump when the layout of a dataset's features file changes, so that older files are not read
# (3: features as fixed-size binary rather than list<float32>).
DATASET_LAYOUT_VERSION = 3
# Rows per row group of a dataset's features file: about 10 MB of features, what training holds in memory.
ROWS_PER_GROUP = 2048


@dataclass(frozen=True)
class FeatureSet:
    """A handle to one dataset's features file, what the training and evaluation steps read."""

    path: Path
    extracted: int
    reused: int
    engine: str

    def row_groups(self, split: str | None = None, metadata: pq.FileMetaData | None = None) -> list[int]:
        metadata = metadata or pq.read_metadata(self.path)
        column = metadata.schema.to_arrow_schema().get_field_index("split")
        return [
            group
            for group in range(metadata.num_row_groups)
            if split is None or metadata.row_group(group).column(column).statistics.max == split
        ]

    def _read(self, split: str | None, columns: list[str]) -> pa.Table:
        with damage_stops_the_run(self.path):
            # Damaged bytes inside a page fail its checksum here rather than train on wrong numbers.
            parquet = pq.ParquetFile(self.path, page_checksum_verification=True)
            return parquet.read_row_groups(self.row_groups(split, parquet.metadata), columns=columns)

    def load(self, split: str | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Features, labels and paths of one split (or of all rows), in memory: for the small splits."""
        table = self._read(split, ["features", "label", "path"])
        return features_matrix(table), table.column("label").to_numpy(), table.column("path").to_pylist()

    def content_hashes(self) -> dict[str, list[str]]:
        """Each split's image content hashes."""
        return {split: self.rows(split, ["sha256"])["sha256"] for split in SPLITS}

    def rows(self, split: str, columns: list[str]) -> dict[str, list]:
        """Some manifest columns of one split, in the file's row order (the order its streams read)."""
        return self._read(split, columns).to_pydict()

    def labels_and_paths(self, split: str) -> tuple[np.ndarray, list[str]]:
        table = self._read(split, ["label", "path"])
        return table.column("label").to_numpy(), table.column("path").to_pylist()

    def stream(self, split: str) -> FeatureStream:
        """The split as shuffled batches read one row group at a time: for the train split, whatever its size."""
        with damage_stops_the_run(self.path):
            metadata = pq.read_metadata(self.path)
        groups = self.row_groups(split, metadata)
        features_column = metadata.schema.to_arrow_schema().get_field_index("features")
        return FeatureStream(
            self.path,
            tuple(groups),
            sum(metadata.row_group(group).num_rows for group in groups),
            sum(metadata.row_group(group).column(features_column).total_uncompressed_size for group in groups),
        )


def dataset_features_path(
    manifest: Manifest, backbone: Backbone, cache_dir: Path, rows_per_group: int = ROWS_PER_GROUP
) -> Path:
    grouping = "" if rows_per_group == ROWS_PER_GROUP else f"-{rows_per_group}rows"
    name = (
        f"{manifest.fingerprint}-{backbone.fingerprint}-{backbone.image_size}px"
        f"-v{DATASET_LAYOUT_VERSION}{grouping}.parquet"
    )
    return Path(cache_dir) / "datasets" / name


def plan_extraction(manifest: Manifest, backbone: Backbone, cache: Place, shard_size: int = 1024) -> list[Shard]:
    """The images whose features are still to extract, as shards; none where the dataset's file
    exists and is intact. `cache` is a local folder or a store URL (its shards read through this
    machine's copy); the dataset's file is this machine's own, in local_copy(cache).

    Temporary files that a killed run left in the feature cache are cleared on the way: they are
    never read, but would fill the disk run after run."""
    cache_dir = local_copy(cache)
    remove_stale_temporaries(FeatureCache(cache, backbone).directory, ".shard-*.tmp")
    for pattern in (".*.parquet.*.tmp", ".assemble-*"):
        remove_stale_temporaries(cache_dir / "datasets", pattern)
    if intact_dataset_features(manifest, dataset_features_path(manifest, backbone, cache_dir), pages=True):
        return []
    return missing_shards(manifest, FeatureCache(cache, backbone), shard_size)


def assemble_features(
    manifest: Manifest,
    backbone: Backbone,
    cache: Place,
    extracted: int = 0,
    engine: str = "cache",
    rows_per_group: int = ROWS_PER_GROUP,
) -> FeatureSet:
    """Writes the dataset's features file (manifest columns + features) from the cache, in bounded
    memory, into local_copy(cache); a store cache's shards extracted elsewhere are fetched first."""
    destination = dataset_features_path(manifest, backbone, local_copy(cache), rows_per_group)
    table = manifest.read()
    if not intact_dataset_features(manifest, destination):
        _write_dataset_features(table, FeatureCache(cache, backbone), destination, rows_per_group)
    return FeatureSet(destination, extracted=extracted, reused=table.num_rows - extracted, engine=engine)


def intact_dataset_features(manifest: Manifest, path: Path, pages: bool = False) -> bool:
    """Whether the dataset's features file is there and whole; a damaged one is dropped (with one
    warning), to be assembled again from the feature cache, whose damaged shards are extracted again.

    The footer tells a file cut short, overwritten or emptied (it has none) and one of another
    dataset (other columns or rows); with `pages`, every page's checksum is verified too, one row
    group at a time, for bytes damaged inside: the planning step does, once per run."""
    expected = pq.read_schema(manifest.path).names + ["features"], pq.read_metadata(manifest.path).num_rows

    def check(path: Path) -> bool:
        parquet = pq.ParquetFile(path, page_checksum_verification=True)
        found = parquet.schema_arrow.names, parquet.metadata.num_rows
        if found != expected:
            raise ValueError(f"{found[1]} rows of {found[0]}, where the manifest gives {expected[1]} of {expected[0]}")
        for group in range(parquet.num_row_groups) if pages else ():
            parquet.read_row_group(group)
        return True

    return bool(read_or_drop(path, check, "dataset features file", "assembled again from the feature cache"))


def _write_dataset_features(
    manifest_table: pa.Table, cache: FeatureCache, destination: Path, rows_per_group: int
) -> None:
    """One row group per split and hash bucket of ≤ ~rows_per_group rows, each sorted by content hash.

    Features move from the cache shards to per-bucket scratch files in one pass, then bucket by
    bucket into the file, so memory holds one shard or one bucket at a time.
    """
    hashes = manifest_table.column("sha256").to_pylist()
    splits = manifest_table.column("split").to_pylist()
    row_of = {sha: row for row, sha in enumerate(hashes)}
    buckets = {split: -(-splits.count(split) // rows_per_group) for split in set(splits)}
    bucket_of = [(split, int(sha[:12], 16) % buckets[split]) for sha, split in zip(hashes, splits)]
    found = np.zeros(len(hashes), bool)
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".assemble-", dir=destination.parent) as scratch:
        writers: dict[tuple[str, int], pa.ipc.RecordBatchFileWriter] = {}
        try:
            for shard in cache.shard_paths():
                table = cache.read_shard(shard)
                if table is None:
                    continue
                shard_features = as_binary_column(table.column("features").combine_chunks())
                by_bucket: dict[tuple[str, int], list[tuple[int, int]]] = {}
                for index, sha in enumerate(table.column("sha256").to_pylist()):
                    row = row_of.get(sha)
                    if row is not None and not found[row]:
                        found[row] = True
                        by_bucket.setdefault(bucket_of[row], []).append((row, index))
                for key, pairs in by_bucket.items():
                    rows, indices = zip(*pairs)
                    batch = pa.record_batch(
                        {"row": pa.array(rows, pa.int64()), "features": shard_features.take(list(indices))}
                    )
                    if key not in writers:
                        writers[key] = pa.ipc.new_file(Path(scratch) / f"{key[0]}-{key[1]}.arrow", batch.schema)
                    writers[key].write_batch(batch)
        finally:
            for writer in writers.values():
                writer.close()
        if not found.all():
            raise RuntimeError(f"feature cache {cache.directory} lacks {int((~found).sum())} of {len(hashes)} images")
        with atomic_path(destination) as temporary:
            output = None
            try:
                for key in sorted(writers, key=lambda key: (SPLITS.index(key[0]), key[1])):
                    with pa.OSFile(str(Path(scratch) / f"{key[0]}-{key[1]}.arrow")) as source:
                        part = pa.ipc.open_file(source).read_all()
                    rows = part.column("row").to_numpy()
                    order = np.argsort([hashes[row] for row in rows], kind="stable")
                    group = manifest_table.take(rows[order]).append_column(
                        "features", part.column("features").take(order)
                    )
                    del part
                    if output is None:
                        output = pq.ParquetWriter(temporary, group.schema, **FEATURES_PARQUET_OPTIONS)
                    output.write_table(group, row_group_size=group.num_rows)
            finally:
                if output is not None:
                    output.close()
