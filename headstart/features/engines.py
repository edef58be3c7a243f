"""What runs the frozen forward pass: TensorFlow or LiteRT, and which of them a backbone gets.

TensorFlow is imported only where it is used: a LiteRT model already converted runs without it,
so extraction can start while TensorFlow is still being imported elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from headstart.backbone.handles import Backbone
from headstart.config import INT8_ENGINE
from headstart.data.preprocessing import resize_batch, resize_images, shrunk_to_fit
from headstart.errors import HeadstartError, file_system_fault, first_line
from headstart.infra.cache_files import read_or_drop
from headstart.infra.native_logs import native_notices_dropped
from headstart.infra.storage import atomic_path, write_json_atomic

PARITY_TOLERANCE = 1e-4


class KerasEngine:
    """Runs the backbone with TensorFlow through hub.KerasLayer."""

    name = "keras"

    def __init__(self, backbone: Backbone):
        from headstart.infra.keras import tf

        layer = backbone.keras_layer()
        self.image_size = backbone.image_size
        self._forward = tf.function(lambda images: layer(images, training=False), reduce_retracing=True)

    def __call__(self, images, threads: int | None = None) -> np.ndarray:
        """Features [n, dim] of float32 images in [0, 1]: a batch, or a list of images of any sizes.
        TensorFlow keeps its own thread pool, so `threads` changes nothing here."""
        return self._forward(resize_batch(images, self.image_size)).numpy()


class LiteRTEngine:
    """Runs a LiteRT conversion of the backbone with XNNPACK, on all requested threads: the float32
    one (converted here once), or the int8 model a quantized backbone is."""

    def __init__(self, backbone: Backbone, cache_dir: Path, threads: int):
        self.name = "litert" if backbone.litert_model is None else INT8_ENGINE
        self.model_path = (
            convert_to_litert(backbone, cache_dir) if backbone.litert_model is None else Path(backbone.litert_model)
        )
        self.threads = threads
        self.image_size = backbone.image_size
        self._runners: dict[int, _LiteRTRunner] = {}

    def __call__(self, images, threads: int | None = None) -> np.ndarray:
        """Features [n, dim] of float32 images in [0, 1]: a batch, or a list of images of any sizes,
        on `threads` threads (default: the engine's own count). Features are bit-for-bit the
        same whatever the thread count."""
        threads = threads or self.threads
        if threads not in self._runners:
            from ai_edge_litert.interpreter import Interpreter

            self._runners[threads] = _LiteRTRunner(
                Interpreter(model_path=str(self.model_path), num_threads=threads), self.image_size
            )
        return self._runners[threads](images)

    @property
    def parity(self) -> float:
        """Max |LiteRT − TensorFlow| measured when the model was converted."""
        return _recorded_parity(self.model_path)


# Images per invoke: a few, so that the interpreter returns to Python, and waits for the GIL while
# another thread holds it, once per few images rather than once per image.
# Features are bit-for-bit the same whatever the batch and thread count.
IMAGES_PER_INVOKE = 4


class _LiteRTRunner:
    """Feeds a converted model a few images per invoke, at their own size where they are enlarged.

    The model resizes its input itself (bilinear, inside the XNNPACK graph), so small images such as
    CIFAR's are never enlarged in NumPy or TensorFlow, whose resize would run beside the
    interpreter and compete with it for the cores. Images larger than the native size on any side are
    shrunk with antialiasing first (`decoded_batches` already does), to exactly the native size,
    where the model's own resize is the identity.
    Consecutive images of one size go together, up to IMAGES_PER_INVOKE: a small batch's
    activations stay in the CPU's cache, and no batch ever needs padding.
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
                # The first allocation creates the XNNPACK delegate, which announces itself.
                with native_notices_dropped() if self._shape is None else contextlib.nullcontext():
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

    from headstart.backbone.hub_module import litert_function
    from headstart.infra.keras import tf

    module = tf.saved_model.load(str(backbone.module_path))
    converter = tf.lite.TFLiteConverter.from_concrete_functions([litert_function(module, size)], module)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    flatbuffer = converter.convert()

    run = _LiteRTRunner(Interpreter(model_content=flatbuffer, num_threads=1), size)
    difference = 0.0
    for probe in (parity_images(max(8, size // 4)), parity_images(size)):
        expected = module(tf.constant(probe)).numpy()  # the very call hub.KerasLayer makes
        difference = max(difference, float(np.abs(run(probe) - expected).max()))

    with atomic_path(path) as temporary:
        temporary.write_bytes(flatbuffer)
    write_json_atomic(
        _parity_record(path),
        {"max_difference": difference, "tensorflow": tf.__version__, **model_record(flatbuffer)},
    )
    return path


def _litert_model_path(backbone: Backbone, cache_dir: Path) -> Path:
    return Path(cache_dir) / "litert" / f"{backbone.fingerprint}-{backbone.image_size}px-v{LITERT_MODEL_VERSION}.tflite"


def _is_converted(model_path: Path) -> bool:
    """Both files a finished conversion leaves, intact: the model, then its parity record (written
    last). Where either is damaged, both are dropped (with one warning) and the backbone converted again."""
    return intact_litert_model(
        model_path, _parity_record(model_path), "LiteRT model", "the backbone is converted to LiteRT again"
    )


def intact_litert_model(model_path: Path, record_path: Path, what: str, again: str) -> bool:
    """Whether a cached LiteRT model and the record written after it (its size and CRC-32, where
    kept) are both there and intact; where either is damaged, both are dropped with one warning."""
    if not Path(model_path).exists():
        return False
    # Imported here, outside the check: a LiteRT missing from the environment damages no file.
    from ai_edge_litert.interpreter import Interpreter  # noqa: F401

    record = read_or_drop(record_path, _read_model_record, f"record of the {what}", again, [model_path])
    if record is None:
        return False
    verified = read_or_drop(
        model_path,
        lambda path: verify_litert_model(path, record.get("bytes"), record.get("crc32")),
        what,
        again,
        [record_path],
    )
    return bool(verified)


def model_record(flatbuffer: bytes) -> dict:
    """What `intact_litert_model` checks a model against: its size and CRC-32."""
    return {"bytes": len(flatbuffer), "crc32": zlib.crc32(flatbuffer)}


def verify_litert_model(path: Path, size: int | None = None, crc32: int | None = None) -> bool:
    """Checks that a .tflite file is a whole LiteRT model: of `size` bytes and their `crc32`
    where they were recorded, with its flatbuffer identifier, and passing the interpreter's own
    verification of the flatbuffer."""
    found = Path(path).stat().st_size
    if size is not None and found != size:
        raise ValueError(f"{found} bytes, where {size} were written")
    with open(path, "rb") as handle:
        if handle.read(8)[4:] != b"TFL3":
            raise ValueError("not a LiteRT flatbuffer (no TFL3 identifier)")
        if crc32 is not None:
            handle.seek(0)
            checksum = 0
            for block in iter(lambda: handle.read(1 << 20), b""):
                checksum = zlib.crc32(block, checksum)
            if checksum != crc32:
                raise ValueError("its bytes are not those written (CRC-32 differs)")
    from ai_edge_litert.interpreter import Interpreter

    Interpreter(model_path=str(path))
    return True


def _parity_record(model_path: Path) -> Path:
    return Path(model_path).with_suffix(".parity.json")


def _read_model_record(path: Path) -> dict:
    record = json.loads(path.read_bytes())
    if not isinstance(record, dict):
        raise ValueError(f"a JSON {type(record).__name__}, not an object")
    # A parity record holds max_difference; records written before the model's size and checksum
    # were kept have neither.
    numbers = {name: record.get(name, 0) for name in ("max_difference", "bytes", "crc32")}
    if path.name.endswith(".parity.json"):
        numbers["max_difference"] = record.get("max_difference")
    for name, value in numbers.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} is not a number")
    return record


def _recorded_parity(model_path: Path) -> float:
    return float(json.loads(_parity_record(model_path).read_text())["max_difference"])


def parity_images(image_size: int, count: int = 4, seed: int = 1234) -> np.ndarray:
    """Smooth random images: realistic enough to exercise every layer, the same on every machine."""
    generator = np.random.default_rng(seed)
    coarse = generator.random((count, 8, 8, 3), dtype=np.float32)
    return resize_images(coarse, image_size).numpy().clip(0.0, 1.0)


@dataclass(frozen=True)
class EngineChoice:
    engine: object
    reason: str


def choose_engine(backbone: Backbone, requested: str, cache_dir: Path, threads: int | None) -> EngineChoice:
    """Picks the engine: LiteRT where it converts and agrees with TensorFlow within 1e-4; the int8
    model of a quantized backbone, which nothing else runs."""
    threads = threads or os.cpu_count() or 1
    if backbone.litert_model is not None:
        if requested == "keras":
            raise HeadstartError(
                f"backbone {backbone.fingerprint} is quantized to int8: "
                f"only LiteRT runs it (give --engine auto or {INT8_ENGINE})"
            )
        return EngineChoice(LiteRTEngine(backbone, cache_dir, threads), "the backbone quantized to int8")
    if requested == INT8_ENGINE:
        raise HeadstartError(
            f"the {INT8_ENGINE} engine runs a backbone quantized when training "
            f"(`headstart train --engine {INT8_ENGINE}`); "
            f"this model's backbone {backbone.fingerprint} is float32"
        )
    if requested == "keras":
        return EngineChoice(KerasEngine(backbone), "requested")
    try:
        litert_engine = LiteRTEngine(backbone, cache_dir, threads)
        difference = litert_engine.parity
    except Exception as error:  # Conversion failures come from deep inside the converter, in many types.
        if isinstance(error, OSError) and file_system_fault(error) is not None:
            raise  # a full or read-only cache is the user's to fix, not a reason to run slower
        if requested == "litert":
            raise HeadstartError(
                f"the LiteRT engine is unavailable for backbone {backbone.handle}: {first_line(error)}"
            ) from None
        return EngineChoice(KerasEngine(backbone), f"LiteRT unavailable ({type(error).__name__}), using TensorFlow")
    if difference > PARITY_TOLERANCE:
        if requested == "litert":
            raise HeadstartError(
                f"LiteRT differs from TensorFlow by {difference:.2e} (> {PARITY_TOLERANCE}) "
                f"for backbone {backbone.handle}"
            )
        return EngineChoice(
            KerasEngine(backbone), f"LiteRT parity {difference:.2e} > {PARITY_TOLERANCE}, using TensorFlow"
        )
    return EngineChoice(litert_engine, f"parity with TensorFlow {difference:.1e}")
