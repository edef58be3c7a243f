"""What runs the frozen forward pass: TensorFlow or LiteRT, fed by a streaming decode pipeline.

TensorFlow is imported only where it is used: a LiteRT model already converted runs without it,
so extraction can start while TensorFlow is still being imported elsewhere.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from headstart.backbone import LITERT_SIGNATURE, Backbone, loading_in_background
from headstart.data import load_image
from headstart.errors import HeadstartError
from headstart.storage import atomic_path, write_json_atomic

PARITY_TOLERANCE = 1e-4
logger = logging.getLogger(__name__)


# --- engines ----------------------------------------------------------------------------------

class KerasEngine:
    """Runs the backbone with TensorFlow through hub.KerasLayer."""

    name = "keras"

    def __init__(self, backbone: Backbone):
        from headstart.keras import tf

        layer = backbone.keras_layer()
        self.image_size = backbone.image_size
        self._forward = tf.function(lambda images: layer(images, training=False), reduce_retracing=True)

    def __call__(self, images) -> np.ndarray:
        """Features [n, dim] of float32 images in [0, 1]: a batch, or a list of images of any sizes."""
        return self._forward(resize_batch(images, self.image_size)).numpy()


class LiteRTEngine:
    """Runs a float32 LiteRT conversion of the backbone with XNNPACK, on all requested threads."""

    name = "litert"

    def __init__(self, backbone: Backbone, cache_dir: Path, threads: int):
        self.model_path = convert_to_litert(backbone, cache_dir)
        self.threads = threads
        self.image_size = backbone.image_size
        self._runners: dict[int, _LiteRTRunner] = {}

    def __call__(self, images) -> np.ndarray:
        """Features [n, dim] of float32 images in [0, 1]: a batch, or a list of images of any sizes."""
        # XNNPACK's threads wait for each other after every layer, so one that shares its core
        # drags the rest: while the backbone loads into TensorFlow beside this engine, two
        # threads ran at 107 img/s and one at 124 (219 with the cores to themselves).
        threads = 1 if loading_in_background() else self.threads
        if threads not in self._runners:
            from ai_edge_litert.interpreter import Interpreter

            self._runners[threads] = _LiteRTRunner(Interpreter(model_path=str(self.model_path), num_threads=threads), self.image_size)
        return self._runners[threads](images)

    @property
    def parity(self) -> float:
        """Max |LiteRT − TensorFlow| measured when the model was converted."""
        return _recorded_parity(self.model_path)


# Images per invoke: as fast as one at a time (measured 244–248 vs 237–246 img/s), with a quarter
# of the returns to Python, each of which waits for the GIL while another thread holds it.
# Features are bit-for-bit the same whatever the batch and thread count.
IMAGES_PER_INVOKE = 4


class _LiteRTRunner:
    """Feeds a converted model a few images per invoke, at their own size where they are enlarged.

    The model resizes its input itself (bilinear, inside the XNNPACK graph), so small images such as
    CIFAR's are never enlarged in NumPy or TensorFlow: measured here, that resize, run beside the
    interpreter, slowed extraction by 20 %. Images larger than the native size on any side are
    shrunk with antialiasing first (`decoded_batches` already does), to exactly the native size,
    where the model's own resize is the identity.
    Consecutive images of one size go together, up to IMAGES_PER_INVOKE: small batches ran ~20 %
    faster than batches of 64 (their activations stay in cache), and no batch ever needs padding.
    """

    def __init__(self, interpreter, image_size: int):
        self.interpreter = interpreter
        self.image_size = image_size
        self._input = interpreter.get_input_details()[0]["index"]
        self._output = interpreter.get_output_details()[0]["index"]
        self._shape: tuple | None = None

    def __call__(self, images) -> np.ndarray:
        images = [shrunk_to_fit(image, self.image_size) for image in images]
        outputs, start = [], 0
        while start < len(images):
            end = start + 1
            while end < len(images) and end - start < IMAGES_PER_INVOKE and images[end].shape == images[start].shape:
                end += 1
            batch = np.ascontiguousarray(np.stack(images[start:end]), np.float32)
            if batch.shape != self._shape:
                self.interpreter.resize_tensor_input(self._input, list(batch.shape), strict=False)
                self.interpreter.allocate_tensors()
                self._shape = batch.shape
            self.interpreter.set_tensor(self._input, batch)
            self.interpreter.invoke()
            outputs.append(self.interpreter.get_tensor(self._output).copy())
            start = end
        return np.concatenate(outputs)


# Bump when the converted model changes (2: takes images of any size and resizes them itself).
LITERT_MODEL_VERSION = 2


def convert_to_litert(backbone: Backbone, cache_dir: Path) -> Path:
    """Converts the backbone to a float32 .tflite file, once per fingerprint and image size.

    The model enlarges its input with a plain bilinear resize, which equals the hub module's
    antialiased resize wherever no side shrinks. The conversion also measures parity
    with TensorFlow on probe images, enlarged and at the native size, while the SavedModel is
    loaded anyway, and records it beside the .tflite file.
    """
    size = backbone.image_size
    path = _litert_model_path(backbone, cache_dir)
    if _is_converted(path):
        return path
    from ai_edge_litert.interpreter import Interpreter

    from headstart.keras import tf

    module = tf.saved_model.load(str(backbone.module_path))
    converter = tf.lite.TFLiteConverter.from_concrete_functions([_litert_function(module, size)], module)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    flatbuffer = converter.convert()

    run = _LiteRTRunner(Interpreter(model_content=flatbuffer, num_threads=1), size)
    difference = 0.0
    for probe in (parity_images(max(8, size // 4)), parity_images(size)):
        expected = module(tf.constant(probe)).numpy()  # the very call hub.KerasLayer makes
        difference = max(difference, float(np.abs(run(probe) - expected).max()))

    with atomic_path(path) as temporary:
        temporary.write_bytes(flatbuffer)
    write_json_atomic(_parity_record(path), {"max_difference": difference, "tensorflow": tf.__version__})
    return path


def _litert_model_path(backbone: Backbone, cache_dir: Path) -> Path:
    return Path(cache_dir) / "litert" / f"{backbone.fingerprint}-{backbone.image_size}px-v{LITERT_MODEL_VERSION}.tflite"


def litert_ready_without_tensorflow(backbone: Backbone, cache_dir: Path) -> bool:
    """Whether `choose_engine` would pick a LiteRT model converted already: one that extracts
    features without importing TensorFlow."""
    model = _litert_model_path(backbone, cache_dir)
    return _is_converted(model) and _recorded_parity(model) <= PARITY_TOLERANCE


def _is_converted(model_path: Path) -> bool:
    """Both files a finished conversion leaves: the model, then its parity record (written last)."""
    return model_path.exists() and _parity_record(model_path).exists()


def _parity_record(model_path: Path) -> Path:
    return Path(model_path).with_suffix(".parity.json")


def _recorded_parity(model_path: Path) -> float:
    return float(json.loads(_parity_record(model_path).read_text())["max_difference"])


def _litert_function(module, size: int):
    """The module's LiteRT signature where it exports one (headstart's own modules do); otherwise
    its serving signature behind a plain bilinear resize to exactly its size."""
    from headstart.keras import tf

    if LITERT_SIGNATURE in module.signatures:
        return module.signatures[LITERT_SIGNATURE]
    serving = module.signatures["serving_default"]

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    def resize_and_extract(images):
        return serving(tf.image.resize(images, (size, size), method="bilinear"))

    return resize_and_extract.get_concrete_function()


def parity_images(image_size: int, count: int = 4, seed: int = 1234) -> np.ndarray:
    """Smooth random images: realistic enough to exercise every layer, the same on every machine."""
    from headstart.mobilenet import resize_images

    generator = np.random.default_rng(seed)
    coarse = generator.random((count, 8, 8, 3), dtype=np.float32)
    return resize_images(coarse, image_size).numpy().clip(0.0, 1.0)


@dataclass(frozen=True)
class EngineChoice:
    engine: object
    reason: str


_engines: dict[tuple, EngineChoice] = {}
_engines_lock = threading.Lock()


def engine_for(backbone: Backbone, requested: str, cache_dir: Path, threads: int | None):
    """The engine for these settings, built on first use in this thread and kept for later shards.

    Per thread, because a LiteRT interpreter must not be shared between threads.
    """
    key = (backbone, requested, str(cache_dir), threads, threading.get_ident())
    with _engines_lock:
        if key not in _engines:
            choice = _engines[key] = choose_engine(backbone, requested, cache_dir, threads)
            fell_back = requested == "auto" and choice.engine.name != "litert"
            (logger.warning if fell_back else logger.info)("feature extraction engine: %s (%s)", choice.engine.name, choice.reason)
        return _engines[key].engine


def choose_engine(backbone: Backbone, requested: str, cache_dir: Path, threads: int | None) -> EngineChoice:
    """Picks the engine: LiteRT where it converts and agrees with TensorFlow within 1e-4."""
    threads = threads or os.cpu_count() or 1
    if requested == "keras":
        return EngineChoice(KerasEngine(backbone), "requested")
    try:
        litert_engine = LiteRTEngine(backbone, cache_dir, threads)
        difference = litert_engine.parity
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

# Batches decoded ahead of the forward pass: enough to hide decoding, few enough to bound memory.
PREFETCH = 2


def decoded_batches(paths: list[str], image_size: int, batch_size: int):
    """Yields lists of float32 images [h, w, 3] in [0, 1], decoding the next batches while the consumer runs.

    Images larger than image_size on any side are shrunk to it (with antialiasing) right away, so
    a batch of photos holds no more than a batch of resized images; smaller ones keep their size,
    since the LiteRT model enlarges them itself. Decoding (PIL) and resizing (TensorFlow) release
    the GIL, so a background thread overlaps them with the forward pass; at most `PREFETCH`
    batches wait in memory.
    """
    chunks = [paths[start:start + batch_size] for start in range(0, len(paths), batch_size)]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode") as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.submit(_decode, chunk, image_size))
            if len(pending) > PREFETCH:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _decode(paths: list[str], image_size: int) -> list[np.ndarray]:
    return [shrunk_to_fit(load_image(Path(path)).astype(np.float32) / 255.0, image_size) for path in paths]


def shrunk_to_fit(image: np.ndarray, image_size: int) -> np.ndarray:
    """The image resized (with antialiasing) to image_size × image_size where any side is larger; else itself."""
    if max(image.shape[:2]) > image_size:
        from headstart.mobilenet import resize_images

        return resize_images(image[np.newaxis], image_size).numpy()[0]
    return image


def image_batches(paths: list[str], image_size: int, batch_size: int):
    """Yields float32 batches [n, size, size, 3] in [0, 1]: decoded ahead, resized here."""
    for images in decoded_batches(paths, image_size, batch_size):
        yield resize_batch(images, image_size)


def resize_batch(images, image_size: int) -> np.ndarray:
    """Images of any sizes as one batch at image_size: one resize call where they share a size.

    Enlarging (every small image, such as CIFAR's 32 px) takes plain bilinear interpolation:
    when no side shrinks, antialiasing changes nothing (measured ≤ 2e-7; the tests check 1e-6) and costs
    2.7× the time.
    """
    from headstart.keras import tf
    from headstart.mobilenet import resize_images

    if len({image.shape for image in images}) > 1:
        return np.concatenate([resize_batch(image[np.newaxis], image_size) for image in images])
    images = np.asarray(images if isinstance(images, np.ndarray) else np.stack(images), np.float32)
    if images.shape[1:3] == (image_size, image_size):
        return images
    if max(images.shape[1:3]) <= image_size:
        return tf.image.resize(images, (image_size, image_size), method="bilinear").numpy()
    return resize_images(images, image_size).numpy()
