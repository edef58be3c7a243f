"""What runs the frozen forward pass: TensorFlow or LiteRT, fed by a streaming tf.data pipeline."""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from headstart.backbone import Backbone
from headstart.data import load_image
from headstart.errors import HeadstartError
from headstart.keras import tf
from headstart.mobilenet import NATIVE_SIZE_SIGNATURE, resize_images
from headstart.storage import atomic_path, write_json_atomic

PARITY_TOLERANCE = 1e-4
logger = logging.getLogger(__name__)


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
        """Runs any number of images through the fixed-batch interpreter, padding the last batch."""
        outputs = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            batch = np.zeros((self.batch_size, *images.shape[1:]), np.float32)
            batch[:len(chunk)] = chunk
            self.interpreter.set_tensor(self._input, batch)
            self.interpreter.invoke()
            outputs.append(self.interpreter.get_tensor(self._output)[:len(chunk)].copy())
        return np.concatenate(outputs)


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


def litert_parity(backbone: Backbone, litert_engine: "LiteRTEngine", cache_dir: Path) -> float:
    """Max |LiteRT − TensorFlow| on a probe batch, measured once per converted model and remembered."""
    record = convert_to_litert(backbone, cache_dir).with_suffix(".parity.json")
    if record.exists():
        return float(json.loads(record.read_text())["max_difference"])
    probe = parity_images(backbone.image_size)
    difference = float(np.abs(litert_engine(probe) - KerasEngine(backbone)(probe)).max())
    write_json_atomic(record, {"max_difference": difference, "tensorflow": tf.__version__})
    return difference


_engines: dict[tuple, EngineChoice] = {}
_engines_lock = threading.Lock()


def engine_for(backbone: Backbone, requested: str, cache_dir: Path, threads: int | None, batch_size: int):
    """The engine for these settings, built on first use in this thread and kept for later shards.

    Per thread, because a LiteRT interpreter must not be shared between threads.
    """
    key = (backbone, requested, str(cache_dir), threads, batch_size, threading.get_ident())
    with _engines_lock:
        if key not in _engines:
            choice = _engines[key] = choose_engine(backbone, requested, cache_dir, threads, batch_size)
            fell_back = requested == "auto" and choice.engine.name != "litert"
            (logger.warning if fell_back else logger.info)("feature extraction engine: %s (%s)", choice.engine.name, choice.reason)
        return _engines[key].engine


def choose_engine(backbone: Backbone, requested: str, cache_dir: Path, threads: int | None, batch_size: int) -> EngineChoice:
    """Picks the engine: LiteRT where it converts and agrees with TensorFlow within 1e-4."""
    threads = threads or os.cpu_count() or 1
    if requested == "keras":
        return EngineChoice(KerasEngine(backbone), "requested")
    try:
        litert_engine = LiteRTEngine(backbone, cache_dir, threads, batch_size)
        difference = litert_parity(backbone, litert_engine, cache_dir)
    except Exception as error:  # Conversion failures come from deep inside the converter, in many types.
        if requested == "litert":
            raise HeadstartError(f"the LiteRT engine is unavailable for backbone {backbone.handle}: {str(error).splitlines()[0] if str(error) else type(error).__name__}") from None
        return EngineChoice(KerasEngine(backbone), f"LiteRT unavailable ({type(error).__name__}), using TensorFlow")
    if difference > PARITY_TOLERANCE:
        if requested == "litert":
            raise HeadstartError(f"LiteRT differs from TensorFlow by {difference:.2e} (> {PARITY_TOLERANCE}) for backbone {backbone.handle}")
        return EngineChoice(KerasEngine(backbone), f"LiteRT parity {difference:.2e} > {PARITY_TOLERANCE}, using TensorFlow")
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
