"""The frozen forward pass, run once per image and cached by content.

Images stream through decode → resize → backbone in batches, so memory stays bounded whatever
the dataset size. Features are cached in Parquet shards keyed by image content hash, backbone
fingerprint and image size: a re-run recomputes only images it has never seen, and a run that
is interrupted keeps every shard it finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from headstart.backbone import Backbone, loading_in_background
from headstart.data import SPLITS, Manifest
from headstart.storage import atomic_path, release_freed_memory, write_parquet_atomic


logger = logging.getLogger(__name__)

# Features are dense floats: dictionary encoding and compression gain nothing on them and made
# reading a row group 2.8× slower (measured: 101 ms vs 37 ms for 4096 × 1280).
FEATURES_PARQUET_OPTIONS = {"use_dictionary": False, "compression": "none"}


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

    def write_shard(self, hashes: list[str], features: np.ndarray) -> Path:
        name = hashlib.sha256("".join(hashes).encode()).hexdigest()[:16]
        table = pa.table({"sha256": hashes, "features": _features_column(features)})
        return write_parquet_atomic(self.directory / f"shard-{name}.parquet", table, **FEATURES_PARQUET_OPTIONS)


# Features are stored as one fixed-size binary value per image (its float32s, little-endian),
# not as a list<float32>: Parquet stores lists with a repetition level per float, which made
# reading 10 000 images' features 4× slower (0.117 s vs 0.030 s) and writing 2.7× slower.
def _features_column(features: np.ndarray) -> pa.Array:
    features = np.ascontiguousarray(features, "<f4")
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(features.shape[1] * 4), len(features), [None, pa.py_buffer(features)])


def _features_matrix(table: pa.Table) -> np.ndarray:
    return _as_matrix(table.column("features").combine_chunks())


def _as_matrix(column: pa.Array) -> np.ndarray:
    if pa.types.is_fixed_size_binary(column.type):
        width = column.type.byte_width
        data = np.frombuffer(column.buffers()[1], "<f4", count=len(column) * width // 4, offset=column.offset * width)
        return data.reshape(len(column), width // 4)
    # A cache shard written before features were binary: list<float32>.
    return column.values.to_numpy(zero_copy_only=False).reshape(len(column), column.type.list_size)


@dataclass(frozen=True)
class FeatureSet:
    """A handle to one dataset's features file, what the training and evaluation tasks read.

    Each row group of the file holds one split's rows of one hash bucket (see
    `assemble_features`), so a split is read, or streamed, without touching the others.
    """

    path: Path
    extracted: int
    reused: int
    engine: str

    def row_groups(self, split: str | None = None, metadata: pq.FileMetaData | None = None) -> list[int]:
        metadata = metadata or pq.read_metadata(self.path)
        column = metadata.schema.to_arrow_schema().get_field_index("split")
        return [group for group in range(metadata.num_row_groups)
                if split is None or metadata.row_group(group).column(column).statistics.max == split]

    def load(self, split: str | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Features, labels and paths of one split (or of all rows), in memory: for the small splits."""
        table = pq.ParquetFile(self.path).read_row_groups(self.row_groups(split), columns=["features", "label", "path"])
        return _features_matrix(table), table.column("label").to_numpy(), table.column("path").to_pylist()

    def labels_and_paths(self, split: str) -> tuple[np.ndarray, list[str]]:
        table = pq.ParquetFile(self.path).read_row_groups(self.row_groups(split), columns=["label", "path"])
        return table.column("label").to_numpy(), table.column("path").to_pylist()

    def stream(self, split: str) -> "FeatureStream":
        """The split as shuffled batches read one row group at a time: for the train split, whatever its size."""
        metadata = pq.read_metadata(self.path)
        groups = self.row_groups(split, metadata)
        features_column = metadata.schema.to_arrow_schema().get_field_index("features")
        return FeatureStream(
            self.path, tuple(groups), sum(metadata.row_group(group).num_rows for group in groups),
            sum(metadata.row_group(group).column(features_column).total_uncompressed_size for group in groups),
        )


@dataclass(frozen=True)
class FeatureStream:
    """Shuffled (features, labels) batches of some row groups; memory holds one row group at a time.

    Each row group is a uniform random sample of its split (rows are grouped by content hash),
    so shuffling the order of the groups and the rows inside each one shuffles the split.
    """

    path: Path
    groups: tuple[int, ...]
    num_rows: int
    features_bytes: int  # the features' size in memory, uncompressed

    def kept_in_memory(self, max_bytes: int) -> "FeatureStream | InMemoryFeatures":
        """The split read into memory once, where it fits in max_bytes; else this stream.
        Either way an epoch visits the same rows in the same order."""
        if self.features_bytes > max_bytes:
            return self
        chunks = list(self.chunks())
        return InMemoryFeatures(
            np.concatenate([features for features, _ in chunks]), np.concatenate([labels for _, labels in chunks]),
            groups=tuple((group, len(labels)) for group, (_, labels) in zip(self.groups, chunks)),
        )

    def chunks(self, order: np.ndarray | None = None):
        """(features, labels) of each row group, in file order or in `order`."""
        parquet = pq.ParquetFile(self.path)
        for group in self.groups if order is None else order:
            table = parquet.read_row_group(int(group), columns=["features", "label"])
            yield _features_matrix(table), table.column("label").to_numpy().astype(np.int64)

    def shuffled_chunks(self, seed: int, epoch: int):
        """One epoch: the row groups in a seeded random order, each with its rows permuted."""
        generator = np.random.default_rng([seed, epoch])
        for features, labels in self.chunks(generator.permutation(np.array(self.groups, dtype=np.int64))):
            order = generator.permutation(len(labels))
            yield features[order], labels[order]


@dataclass(frozen=True)
class InMemoryFeatures:
    """The FeatureStream interface over arrays already in memory."""

    features: np.ndarray
    labels: np.ndarray
    # (row group, rows) of each group the rows came from, in file order, when they are a
    # FeatureStream's: an epoch then shuffles them exactly as that stream would.
    groups: tuple[tuple[int, int], ...] = ()

    @property
    def num_rows(self) -> int:
        return len(self.labels)

    def chunks(self):
        yield self.features, self.labels.astype(np.int64)

    def shuffled_order(self, seed: int, epoch: int) -> np.ndarray:
        """Row positions in one epoch's order, drawn as `FeatureStream.shuffled_chunks` draws them."""
        generator = np.random.default_rng([seed, epoch])
        if not self.groups:
            return generator.permutation(len(self.labels))
        start_and_rows, start = {}, 0
        for group, rows in self.groups:
            start_and_rows[group] = (start, rows)
            start += rows
        group_order = generator.permutation(np.array([group for group, _ in self.groups], dtype=np.int64)).tolist()
        return np.concatenate([start_and_rows[group][0] + generator.permutation(start_and_rows[group][1]) for group in group_order])

    def shuffled_chunks(self, seed: int, epoch: int):
        order = self.shuffled_order(seed, epoch)
        yield self.features[order], self.labels[order].astype(np.int64)


@dataclass(frozen=True)
class ExtractionSettings:
    """How the forward pass runs: engine, threads, batch size. Small, so it travels to workers."""

    engine: str = "auto"
    threads: int | None = None
    batch_size: int = 64


# Bump when the layout of a dataset's features file changes, so that older files are not read
# (3: features as fixed-size binary rather than list<float32>).
DATASET_LAYOUT_VERSION = 3


def dataset_features_path(manifest: Manifest, backbone: Backbone, cache_dir: Path) -> Path:
    name = f"{manifest.fingerprint}-{backbone.fingerprint}-{backbone.image_size}px-v{DATASET_LAYOUT_VERSION}.parquet"
    return Path(cache_dir) / "datasets" / name


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
    While this process loads TensorFlow in the background, a LiteRT model converted earlier runs
    in a child process instead (see `_extract_shard_in_child`).
    """
    if loading_in_background() and settings.engine != "keras":
        from headstart.engines import litert_ready_without_tensorflow

        if litert_ready_without_tensorflow(backbone, cache_dir):
            engine = _extract_shard_in_child(shard, backbone, cache_dir, settings, progress)
            if engine is not None:
                return engine
    return _extract_shard_here(shard, backbone, cache_dir, settings, progress)


def _extract_shard_here(shard: list[tuple[str, str]], backbone: Backbone, cache_dir: Path, settings: ExtractionSettings, progress=None) -> str:
    from headstart.engines import decoded_batches, engine_for

    engine = engine_for(backbone, settings.engine, Path(cache_dir), settings.threads)
    outputs = []
    for images in decoded_batches([path for _, path in shard], backbone.image_size, settings.batch_size):
        outputs.append(engine(images))
        if progress is not None:
            progress.update(len(images))
    FeatureCache(cache_dir, backbone).write_shard([sha for sha, _ in shard], np.concatenate(outputs))
    del outputs
    release_freed_memory()
    return engine.name


def _extract_shard_in_child(shard: list[tuple[str, str]], backbone: Backbone, cache_dir: Path, settings: ExtractionSettings, progress=None) -> str | None:
    """Extracts the shard with LiteRT in a child process, which writes the cache shard itself.

    Importing TensorFlow in this process holds the GIL for long stretches inside C code, so the
    LiteRT engine running beside it in the same process lost a third of its speed; in a process
    of its own it keeps it. Extracting 910 new images at 224 px while loading the backbone into
    Keras, alternately four times each: 6.3–8.1 s (mean 7.5) this way, 7.0–9.1 s (mean 8.1) in
    one process. Returns None, after a warning, when the child fails: this process then extracts
    the shard itself, and meets, and reports, any error the images cause.
    """
    request = {
        "shard": shard, "cache_dir": str(cache_dir), "settings": asdict(settings),
        "backbone": {**asdict(backbone), "module_path": str(backbone.module_path)},
    }
    # The child finds headstart where this process found it, however it was started.
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(entry for entry in sys.path if entry)}
    with tempfile.TemporaryFile(mode="w+") as errors:
        try:
            child = subprocess.Popen(
                [sys.executable, "-c", "from headstart.features import serve_extraction_request; serve_extraction_request()"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, text=True, env=environment,
            )
        except OSError as error:
            logger.warning("could not start a child process to extract features (%s); extracting here instead", error)
            return None
        reply: dict = {}
        reported = 0
        try:
            with contextlib.suppress(OSError):  # a child gone already says so by its exit status, below
                with child.stdin:
                    child.stdin.write(json.dumps(request) + "\n")
            for line in child.stdout:
                message = json.loads(line) if line.startswith("{") else {}
                if "images" in message and progress is not None:
                    progress.update(message["images"])
                    reported += message["images"]
                reply.update(message)
            child.wait()
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        if child.returncode == 0 and "engine" in reply:
            logger.info("feature extraction engine: %s, in a child process while TensorFlow loads", reply["engine"])
            return reply["engine"]
        errors.seek(0)
        last_line = ([line for line in errors.read().splitlines() if line.strip()] or [f"exit status {child.returncode}"])[-1]
        logger.warning("extracting in a child process failed (%s); extracting here instead", last_line)
        if reported and progress is not None:
            progress.update(-reported)
        return None


def serve_extraction_request() -> None:
    """The child's side of `_extract_shard_in_child`: one JSON request on stdin, JSON lines on stdout."""
    request = json.loads(sys.stdin.readline())
    backbone = Backbone(**{**request["backbone"], "module_path": Path(request["backbone"]["module_path"])})

    class Progress:
        @staticmethod
        def update(count: int) -> None:
            print(json.dumps({"images": count}), flush=True)

    engine = _extract_shard_here([tuple(pair) for pair in request["shard"]], backbone, Path(request["cache_dir"]),
                                 ExtractionSettings(**request["settings"]), Progress())
    print(json.dumps({"engine": engine}), flush=True)


# Rows per row group of a dataset's features file: about 10 MB of features, what training holds in memory.
ROWS_PER_GROUP = 2048


def assemble_features(manifest: Manifest, backbone: Backbone, cache_dir: Path, extracted: int = 0, engine: str = "cache") -> FeatureSet:
    """Writes the dataset's features file (manifest columns + features) from the cache, in bounded memory."""
    destination = dataset_features_path(manifest, backbone, cache_dir)
    table = manifest.read()
    if not destination.exists():
        _write_dataset_features(table, FeatureCache(cache_dir, backbone), destination)
    return FeatureSet(destination, extracted=extracted, reused=table.num_rows - extracted, engine=engine)


def _write_dataset_features(manifest_table: pa.Table, cache: FeatureCache, destination: Path) -> None:
    """One row group per split and hash bucket of ≤ ~ROWS_PER_GROUP rows, each sorted by content hash.

    The layout depends only on the images, never on which shards the cache happens to hold, so
    training streams the same batches from it on every machine. Features move from the cache
    shards to per-bucket scratch files in one pass, then bucket by bucket into the file.
    """
    hashes = manifest_table.column("sha256").to_pylist()
    splits = manifest_table.column("split").to_pylist()
    row_of = {sha: row for row, sha in enumerate(hashes)}
    buckets = {split: -(-splits.count(split) // ROWS_PER_GROUP) for split in set(splits)}
    bucket_of = [(split, int(sha[:12], 16) % buckets[split]) for sha, split in zip(hashes, splits)]
    found = np.zeros(len(hashes), bool)
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".assemble-", dir=destination.parent) as scratch:
        writers: dict[tuple[str, int], pa.ipc.RecordBatchFileWriter] = {}
        try:
            for shard in cache.shard_paths():
                table = pq.read_table(shard)
                shard_features = table.column("features").combine_chunks()
                if not pa.types.is_fixed_size_binary(shard_features.type):
                    shard_features = _features_column(_as_matrix(shard_features))
                by_bucket: dict[tuple[str, int], list[tuple[int, int]]] = {}
                for index, sha in enumerate(table.column("sha256").to_pylist()):
                    row = row_of.get(sha)
                    if row is not None and not found[row]:
                        found[row] = True
                        by_bucket.setdefault(bucket_of[row], []).append((row, index))
                for key, pairs in by_bucket.items():
                    rows, indices = zip(*pairs)
                    batch = pa.record_batch({"row": pa.array(rows, pa.int64()), "features": shard_features.take(list(indices))})
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
                    group = manifest_table.take(rows[order]).append_column("features", part.column("features").take(order))
                    del part
                    if output is None:
                        output = pq.ParquetWriter(temporary, group.schema, **FEATURES_PARQUET_OPTIONS)
                    output.write_table(group, row_group_size=group.num_rows)
            finally:
                if output is not None:
                    output.close()


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
