"""Full-integer int8: weights and activations in 8 bits, calibrated on the user's own training images.

Two things are quantized this way: the frozen backbone, as the `litert-int8` feature-extraction
engine (`quantized_backbone`), and the whole classifier, as an int8 `.tflite` export
(headstart.export). Both use the TFLite converter's post-training quantization: int8 weights per
output channel, int8 activations whose ranges come from the representative images. The ranges of
ReLU6 outputs end at a high percentile of their values there (RANGE_ENDS) rather than at their
maximum (`narrowed_ranges`): the int8 steps then resolve the values those tensors usually take instead of
spanning rare peaks, which saturate instead.

An int8 backbone computes other features than the float one, so it is a backbone of its own: its
fingerprint names the float backbone, the quantization and the calibration images, and the feature
cache, the training key and the reuse of runs all follow that fingerprint, never mixing its
features with float ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from headstart.backbone.handles import Backbone
from headstart.errors import HeadstartError
from headstart.preprocessing import decoded_batches
from headstart.storage import atomic_path

INT8_ENGINE = "litert-int8"
# Training images that calibrate activation ranges: a few hundred is the usual advice; more
# lengthened the conversion without helping the classifier export (README, "On phones and boards").
REPRESENTATIVE_IMAGES = 200
# Fewer usable calibration images than this and the ranges would be guesses.
MINIMUM_CALIBRATION_IMAGES = 10
CALIBRATION_DECODE_BATCH = 64
# Where a ReLU6 output's int8 range may end, as percentiles of its calibration values: the int8
# export takes the one whose file agrees best with the float model on the run's validation split
# (headstart.export); the first is the int8 engine's, which has no classifier yet to choose with.
# Below 99.9 and at 100 (the maximum), both runs measured in the README agreed less.
RANGE_ENDS = (99.9, 99.95, 99.97, 99.99)
# Bump when the conversion changes: quantized backbones and their features are then made anew.
QUANTIZED_BACKBONE_VERSION = 2


def representative_rows(rows: Iterable[dict]) -> list[dict]:
    """Manifest rows (path, label, sha256, split) of up to REPRESENTATIVE_IMAGES training images,
    spread evenly over the training split in content-hash order: every class in its share, and the
    same images whatever order the files were listed in."""
    train = sorted((row for row in rows if row["split"] == "train"), key=lambda row: row["sha256"])
    step = max(1, len(train) // REPRESENTATIVE_IMAGES)
    return train[::step][:REPRESENTATIVE_IMAGES]


def full_integer(converter, representative: Callable[[], Iterable[np.ndarray]], input_type=None,
                 range_ends: tuple[float, ...] = RANGE_ENDS[:1]) -> dict[float, bytes]:
    """What a TFLite converter makes with weights and activations quantized to int8, calibrated on
    the float32 batches that `representative()` yields, with ReLU6 ranges ending at each of
    `range_ends` (`narrowed_ranges`): range end → flatbuffer. The input is `input_type` (float32
    unless given), the output float32.

    The converter's own two steps, with the ranges narrowed in between: it calibrates (records each
    tensor's range in a float model) once, then the same quantizer its `convert()` calls quantizes.
    Both steps are reached through the converter's private hooks (the calibration-only switch and
    `mlir_quantize`), which its own quantization debugger uses too; they are pinned with TensorFlow
    in uv.lock, and tests/test_export.py checks the narrowing on every upgrade.
    """
    from tensorflow.lite.python.convert import mlir_quantize

    from headstart.keras import tf

    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.representative_dataset = lambda: ([batch] for batch in representative())
    converter._experimental_calibrate_only = True
    calibrated = converter.convert()
    return {end: mlir_quantize(narrowed, input_data_type=input_type or tf.float32, output_data_type=tf.float32)
            for end, narrowed in narrowed_ranges(calibrated, representative, range_ends).items()}


RELU6 = 3  # tflite::ActivationFunctionType


def narrowed_ranges(calibrated: bytes, representative: Callable[[], Iterable[np.ndarray]], range_ends: tuple[float, ...]) -> dict[float, bytes]:
    """For each percentile in `range_ends`, the calibrated float model with the recorded range of
    every ReLU6 output (a convolution with ReLU6 fused) ending at that percentile of the values it
    takes on the batches of `representative()`, where that is below its maximum.

    In int8 a value above the range saturates, so this clips exactly as a lower ReLU cap would,
    at no cost in operations.
    """
    import os
    import warnings

    from ai_edge_litert.interpreter import Interpreter
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(calibrated)
    graph = model.subgraphs[0]
    relu6_kinds = {schema.BuiltinOperator.CONV_2D, schema.BuiltinOperator.DEPTHWISE_CONV_2D}
    targets = [operator.outputs[0] for operator in graph.operators
               if model.operatorCodes[operator.opcodeIndex].builtinCode in relu6_kinds
               and getattr(operator.builtinOptions, "fusedActivationFunction", None) == RELU6
               and graph.tensors[operator.outputs[0]].quantization is not None]
    with warnings.catch_warnings():  # keeping every tensor is the point here, not a debugging slip
        warnings.simplefilter("ignore", UserWarning)
        interpreter = Interpreter(model_content=bytes(calibrated), experimental_preserve_all_tensors=True, num_threads=os.cpu_count() or 1)
    batches = list(representative())
    tops = {tensor: np.empty(0, np.float32) for tensor in targets}
    shape, counts = None, {}
    for batch in batches:
        if batch.shape != shape:
            interpreter.resize_tensor_input(interpreter.get_input_details()[0]["index"], batch.shape)
            interpreter.allocate_tensors()
            shape = batch.shape
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], batch.astype(np.float32))
        interpreter.invoke()
        for tensor in targets:
            values = interpreter.get_tensor(tensor).ravel()
            # Every batch enlarges to the model's size, so each gives a tensor this many values.
            counts[tensor] = values.size * len(batches)
            tops[tensor] = _largest(np.concatenate([tops[tensor], values]), _above(counts[tensor], min(range_ends)))
    recorded = {tensor: float(graph.tensors[tensor].quantization.max[0]) for tensor in targets
                if graph.tensors[tensor].quantization.max is not None and len(graph.tensors[tensor].quantization.max) == 1}
    variants = {}
    for end in range_ends:
        for tensor, maximum in recorded.items():
            graph.tensors[tensor].quantization.max = [min(maximum, float(np.sort(tops[tensor])[-_above(counts[tensor], end)]))]
        variants[end] = bytes(flatbuffer_utils.convert_object_to_bytearray(model))
    return variants


def _above(count: int, percentile: float) -> int:
    """How many of `count` values lie at or above the percentile: at least one, the largest."""
    return max(1, int(np.ceil(count * (100.0 - percentile) / 100.0)))


def _largest(values: np.ndarray, count: int) -> np.ndarray:
    return values if values.size <= count else np.partition(values, values.size - count)[values.size - count:]


def quantized_backbone(backbone: Backbone, calibration: list[dict], cache_dir: Path) -> Backbone:
    """The backbone as a full-integer LiteRT model calibrated on `calibration` (manifest rows of
    training images), converted once per backbone, image size and calibration set: the Backbone
    whose features the `litert-int8` engine computes."""
    hashes = sorted(row["sha256"] for row in calibration)
    digest = hashlib.sha256(json.dumps([backbone.fingerprint, backbone.image_size, hashes, QUANTIZED_BACKBONE_VERSION]).encode())
    fingerprint = f"{backbone.fingerprint}-int8-{digest.hexdigest()[:12]}"
    path = Path(cache_dir) / "litert" / f"{fingerprint}-{backbone.image_size}px.tflite"
    if not path.is_file():
        flatbuffer = _convert_backbone(backbone, _calibration_images(calibration, backbone.image_size))
        with atomic_path(path) as temporary:
            temporary.write_bytes(flatbuffer)
    return dataclasses.replace(backbone, fingerprint=fingerprint, litert_model=path)


def _calibration_images(rows: list[dict], image_size: int) -> list[np.ndarray]:
    """The images as the extraction engine takes them (float32 in [0, 1], shrunk to fit, one per
    batch), decoded as extraction decodes them: files no longer holding the content they were
    listed with are left out."""
    images = [image[np.newaxis] for decoded in decoded_batches([row["path"] for row in rows], image_size, CALIBRATION_DECODE_BATCH,
                                                               [row["sha256"] for row in rows]) for image in decoded.images]
    if len(images) < MINIMUM_CALIBRATION_IMAGES:
        raise HeadstartError(f"the int8 engine calibrates on training images, and only {len(images)} were usable "
                             f"(at least {MINIMUM_CALIBRATION_IMAGES} are needed)")
    return images


def _convert_backbone(backbone: Backbone, images: list[np.ndarray]) -> bytes:
    from headstart.backbone.hub_module import litert_function
    from headstart.keras import tf
    from headstart.quiet import native_notices_dropped

    module = tf.saved_model.load(str(backbone.module_path))
    converter = tf.lite.TFLiteConverter.from_concrete_functions([litert_function(module, backbone.image_size)], module)
    try:
        with native_notices_dropped(), native_notices_dropped(1):
            return full_integer(converter, lambda: iter(images))[RANGE_ENDS[0]]
    except Exception as error:  # Conversion failures come from deep inside the converter, in many types.
        raise HeadstartError(f"backbone {backbone.handle} could not be quantized to int8: {str(error).splitlines()[0] if str(error) else type(error).__name__}") from None
