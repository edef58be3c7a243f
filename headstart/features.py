"""The frozen forward pass, run once per image and cached by content.

Images stream through decode → resize → backbone in batches, so memory stays bounded whatever
the dataset size. Features are cached in Parquet shards keyed by image content hash, backbone
fingerprint and image size: a re-run recomputes only images it has never seen, and a run that
is interrupted keeps every shard it finished.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from headstart.backbone import NATIVE_SIZE_SIGNATURE, Backbone, resize_images
from headstart.data import Manifest, load_image
from headstart.errors import HeadstartError
from headstart.keras import tf
from headstart.storage import atomic_path, write_parquet_atomic

PARITY_TOLERANCE = 1e-4


# --- engines ----------------------------------------------------------------------------------

class KerasEngine:
    """Runs the backbone with TensorFlow through hub.KerasLayer."""

    name = "keras"

    def __init__(self, backbone: Backbone):
        layer = backbone.keras_layer()
        self._forward = tf.function(lambda images: layer(images, training=False), reduce_retracing=True)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self._forward(tf.convert_to_tensor(images, tf.float32)).numpy()


class LiteRTEngine:
    """Runs a float32 LiteRT conversion of the backbone with XNNPACK, on all requested threads."""

    name = "litert"

    def __init__(self, backbone: Backbone, cache_dir: Path, threads: int, batch_size: int):
        from ai_edge_litert.interpreter import Interpreter

        model_path = convert_to_litert(backbone, cache_dir)
        self.batch_size = batch_size
        self.interpreter = Interpreter(model_path=str(model_path), num_threads=threads)
        size = backbone.image_size
        self._input = self.interpreter.get_input_details()[0]["index"]
        self.interpreter.resize_tensor_input(self._input, [batch_size, size, size, 3], strict=False)
        self.interpreter.allocate_tensors()
        self._output = self.interpreter.get_output_details()[0]["index"]

    def __call__(self, images: np.ndarray) -> np.ndarray:
        count = len(images)
        if count != self.batch_size:
            padded = np.zeros((self.batch_size, *images.shape[1:]), np.float32)
            padded[:count] = images
            images = padded
        self.interpreter.set_tensor(self._input, np.ascontiguousarray(images, np.float32))
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self._output)[:count].copy()


def convert_to_litert(backbone: Backbone, cache_dir: Path) -> Path:
    """Converts the backbone at its native size to a float32 .tflite file, once per fingerprint."""
    path = Path(cache_dir) / "litert" / f"{backbone.fingerprint}-{backbone.image_size}px.tflite"
    if path.exists():
        return path
    size = backbone.image_size
    module = tf.saved_model.load(str(backbone.module_path))
    concrete = _native_size_function(module, size)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], module)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    with atomic_path(path) as temporary:
        temporary.write_bytes(converter.convert())
    return path


def _native_size_function(module, size: int):
    """The module's signature at exactly size × size where it exports one, else its serving signature."""
    return module.signatures.get(NATIVE_SIZE_SIGNATURE) or module.signatures["serving_default"]


def parity_images(image_size: int, count: int = 4, seed: int = 1234) -> np.ndarray:
    """Smooth random images: realistic enough to exercise every layer, the same on every machine."""
    generator = np.random.default_rng(seed)
    coarse = generator.random((count, 8, 8, 3), dtype=np.float32)
    return resize_images(coarse, image_size).numpy().clip(0.0, 1.0)


@dataclass(frozen=True)
class EngineChoice:
    engine: object
    reason: str


def choose_engine(backbone: Backbone, requested: str, cache_dir: Path, threads: int | None, batch_size: int) -> EngineChoice:
    """Picks the engine: LiteRT where it converts and agrees with TensorFlow within 1e-4."""
    threads = threads or os.cpu_count() or 1
    keras_engine = KerasEngine(backbone)
    if requested == "keras":
        return EngineChoice(keras_engine, "requested")
    try:
        litert_engine = LiteRTEngine(backbone, cache_dir, threads, batch_size)
        probe = parity_images(backbone.image_size)
        difference = float(np.abs(litert_engine(probe) - keras_engine(probe)).max())
    except Exception as error:  # Conversion failures come from deep inside the converter, in many types.
        if requested == "litert":
            raise HeadstartError(f"the LiteRT engine is unavailable for backbone {backbone.handle}: {str(error).splitlines()[0] if str(error) else type(error).__name__}") from None
        return EngineChoice(keras_engine, f"LiteRT unavailable ({type(error).__name__}), using TensorFlow")
    if difference > PARITY_TOLERANCE:
        if requested == "litert":
            raise HeadstartError(f"LiteRT differs from TensorFlow by {difference:.2e} (> {PARITY_TOLERANCE}) for backbone {backbone.handle}")
        return EngineChoice(keras_engine, f"LiteRT parity {difference:.2e} > {PARITY_TOLERANCE}, using TensorFlow")
    return EngineChoice(litert_engine, f"parity with TensorFlow {difference:.1e}")


# --- streaming decode and resize -----------------------------------------------------------------

def image_batches(paths: list[str], image_size: int, batch_size: int, threads: int | None = None):
    """Yields float32 batches [n, size, size, 3] in [0, 1], decoding ahead of the consumer."""

    def decode(path):
        return load_image(Path(path.numpy().decode())).astype(np.float32) / 255.0

    def decode_and_resize(path):
        image = tf.py_function(decode, [path], tf.float32)
        image.set_shape([None, None, 3])
        return resize_images(image[tf.newaxis], image_size)[0]

    dataset = tf.data.Dataset.from_tensor_slices(tf.constant(paths, tf.string))
    dataset = dataset.map(decode_and_resize, num_parallel_calls=threads or tf.data.AUTOTUNE, deterministic=True)
    dataset = dataset.batch(batch_size).prefetch(2)
    for batch in dataset:
        yield batch.numpy()


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
