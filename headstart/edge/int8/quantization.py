"""Full-integer int8: weights and activations in 8 bits, calibrated on the user's own training images.

Two things are quantized this way: the frozen backbone, as the `litert-int8` feature-extraction
engine (`quantized_backbone`), and the whole classifier, as an int8 `.tflite` export
(headstart.edge.export). Both use the TFLite converter's post-training quantization (int8 weights per
output channel, one int8 scale per activation tensor) with four steps of our own in between:
the channels of tensors that allow it (those feeding depthwise convolutions, and the projections
with the residual sums over them) are equalized first (headstart.edge.int8.equalization), so that no
channel keeps only a few of its tensor's steps; the convolutions' weights are rounded to int8 so
that their errors cancel on the representative images (headstart.edge.int8.rounding), not each to its
nearest step; the ranges are then measured on those images (`measured_ranges`) rather than taken
from the converter's calibration, which widens some; and a ReLU6 output's range ends at a high
percentile of its values there (RANGE_ENDS) rather than at its maximum: the int8 steps then
resolve the values those tensors usually take instead of spanning rare peaks, which saturate instead.

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
from ai_edge_litert.schema_py_generated import ActivationFunctionType, BuiltinOperator

from headstart.backbone.handles import Backbone
from headstart.data.preprocessing import decoded_batches
from headstart.edge.int8.tflite_weights import fused_activation, operator_kind, tensor_values
from headstart.errors import HeadstartError, first_line
from headstart.features.engines import intact_litert_model, model_record
from headstart.infra.storage import atomic_path, write_json_atomic

# Training images that calibrate activation ranges: a few hundred is the usual advice; more
# lengthened the conversion without helping the classifier export (README, "On phones and boards").
REPRESENTATIVE_IMAGES = 200
# Fewer usable calibration images than this and the ranges would be guesses.
MINIMUM_CALIBRATION_IMAGES = 10
CALIBRATION_DECODE_BATCH = 64
# Where a ReLU6 output's int8 range may end, as percentiles of its calibration values: the int8
# export takes the one whose file comes closest to the float model on the run's validation split
# (headstart.edge.export). The first, the one both runs in the README chose, is what the int8 engine
# uses, having no classifier yet to choose with, and the export where a run has no validation images.
# Below 99.9 both runs measured in the README agreed less; so did the maximum (100) while the ranges
# came from the converter's calibration (measured now, it is within chance).
RANGE_ENDS = (99.99, 99.97, 99.95, 99.9)
# Bump when the conversion changes: quantized backbones and their features are then made anew.
QUANTIZED_BACKBONE_VERSION = 5


def representative_rows(rows: Iterable[dict]) -> list[dict]:
    """Manifest rows (path, label, sha256, split) of up to REPRESENTATIVE_IMAGES training images,
    spread evenly over the training split in content-hash order: every class in its share, and the
    same images whatever order the files were listed in."""
    train = sorted((row for row in rows if row["split"] == "train"), key=lambda row: row["sha256"])
    step = max(1, len(train) // REPRESENTATIVE_IMAGES)
    return train[::step][:REPRESENTATIVE_IMAGES]


def full_integer(
    converter,
    representative: Callable[[], Iterable[np.ndarray]],
    input_type=None,
    range_ends: tuple[float, ...] = RANGE_ENDS[:1],
) -> dict[float, bytes]:
    """What a TFLite converter makes with weights and activations quantized to int8, calibrated on
    the float32 batches that `representative()` yields: range end → flatbuffer, one per percentile
    in `range_ends` at which ReLU6 ranges end. The input is `input_type` (float32 unless given), the
    output float32.

    The converter's own steps, with ours in between (`calibrate_then_quantize`): it marks the
    tensors to quantize in a float model (its calibration, on one batch), the channels are equalized
    where they can be scaled (headstart.edge.int8.equalization), the convolutions' weights are put on
    their int8 grids so that their rounding errors cancel on the batches (headstart.edge.int8.rounding),
    the ranges are measured on that model (`measured_ranges`), then the same quantizer its
    `convert()` calls quantizes.
    """
    from tensorflow.lite.tools import flatbuffer_utils

    from headstart.edge.int8.equalization import equalize, scalable_channels
    from headstart.edge.int8.rounding import round_compensating
    from headstart.infra.keras import tf

    batches = list(representative())
    if not batches:
        raise HeadstartError("int8 conversion calibrates on images, and none could be read")

    def ranged(marked: bytes) -> dict[float, bytes]:
        model = flatbuffer_utils.convert_bytearray_to_object(marked)
        groups = scalable_channels(model)
        if groups:
            equalize(
                model,
                groups,
                channel_ranges(model, batches, sorted({tensor for group in groups for tensor in group.tensors})),
            )
        round_compensating(model, batches)
        return measured_ranges(model, batches, range_ends)

    # The converter's calibration only marks the tensors to quantize here (one batch does that):
    # the ranges are measured on all of them.
    return calibrate_then_quantize(converter, batches[0], ranged, input_type or tf.float32)


def calibrate_then_quantize(
    converter, marking_batch: np.ndarray, set_ranges: Callable[[bytes], dict], input_type
) -> dict:
    """The TFLite converter's full-integer quantization cut in two, with `set_ranges` in between.
    The converter (a TFLiteConverter of a float model) calibrates on `marking_batch` and gives back
    the float model (a flatbuffer) with every tensor it will quantize marked by a range, one value
    each; `set_ranges` makes flatbuffers of that model with the ranges (and weights) wanted, by
    key; each is then quantized by the quantizer `convert()` itself runs next: int8 weights per
    output channel, int8 activations, `input_type` in and float32 out. Returns key → int8 flatbuffer.

    This is the one place headstart reaches TensorFlow's private API, two hooks that TFLite's own
    quantization debugger (tensorflow/lite/tools/optimize/debugging) uses as well:

    - `TFLiteConverter._experimental_calibrate_only`: set, `convert()` returns the calibrated float
      model instead of quantizing it;
    - `tensorflow.lite.python.convert.mlir_quantize`: the quantizer `convert()` runs on that model.

    TensorFlow is pinned in uv.lock; the day an upgrade removes or changes either hook,
    tests/test_quantization.py::test_the_private_converter_hooks_int8_relies_on_still_behave fails
    and names it.
    """
    from tensorflow.lite.python.convert import mlir_quantize

    from headstart.infra.keras import tf

    if not hasattr(converter, "_experimental_calibrate_only"):
        # Set anyway, the attribute would do nothing and convert() would quantize with its own ranges.
        raise HeadstartError(
            f"the TFLite converter of TensorFlow {tf.__version__} has no calibration-only switch "
            "(_experimental_calibrate_only), which int8 conversion relies on"
        )
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.representative_dataset = lambda: iter([[marking_batch]])
    converter._experimental_calibrate_only = True
    return {
        key: mlir_quantize(ranged, input_data_type=input_type, output_data_type=tf.float32)
        for key, ranged in set_ranges(converter.convert()).items()
    }


def measured_ranges(model, batches: list[np.ndarray], range_ends: tuple[float, ...]) -> dict[float, bytes]:
    """For each percentile in `range_ends`, the float model (a tflite ModelT its converter marked for
    quantization) with the range of every marked tensor measured on the batches: from its least to
    its largest value, except that the range of a ReLU6 output (a convolution with ReLU6 fused) ends
    at that percentile of its values where that is below its largest.

    Measured, not taken from the converter's calibration, which reads an operation's inputs after
    the operation ran: where it ran in place (an ADD or MUL writing over its input), the input's
    range takes in the output's values too, up to twice as wide in MobileNetV2's residual sums. In
    int8 a value above a range saturates, so a narrowed range clips exactly as a lower ReLU cap
    would, at no cost in operations.
    """
    from tensorflow.lite.tools import flatbuffer_utils

    graph = model.subgraphs[0]
    relu6_kinds = {BuiltinOperator.CONV_2D, BuiltinOperator.DEPTHWISE_CONV_2D}
    marked = [
        index
        for index, tensor in enumerate(graph.tensors)
        if tensor.quantization is not None
        and tensor.quantization.min is not None
        and len(tensor.quantization.min) == 1
        and model.buffers[tensor.buffer].data is None
    ]
    relu6 = {
        operator.outputs[0]
        for operator in graph.operators
        if operator_kind(model, operator) in relu6_kinds and fused_activation(operator) == ActivationFunctionType.RELU6
    } & set(marked)
    least, largest = {tensor: np.inf for tensor in marked}, {tensor: -np.inf for tensor in marked}
    tops, counts = {tensor: np.empty(0, np.float32) for tensor in relu6}, dict.fromkeys(relu6, 0)
    for values in tensor_values(model, batches, marked):
        for tensor, value in values.items():
            least[tensor], largest[tensor] = (
                min(least[tensor], float(value.min())),
                max(largest[tensor], float(value.max())),
            )
            if tensor in relu6:
                counts[tensor] += value.size
                # Every batch enlarges to the model's size, so all batches together give about this many values.
                tops[tensor] = _largest(
                    np.concatenate([tops[tensor], value.ravel()]), _above(value.size * len(batches), min(range_ends))
                )
    for tensor in marked:
        graph.tensors[tensor].quantization.min, graph.tensors[tensor].quantization.max = (
            [least[tensor]],
            [largest[tensor]],
        )
    descending = {tensor: np.sort(top)[::-1] for tensor, top in tops.items()}
    variants = {}
    for end in range_ends:
        for tensor, top in descending.items():
            graph.tensors[tensor].quantization.max = [min(largest[tensor], float(top[_above(counts[tensor], end) - 1]))]
        variants[end] = bytes(flatbuffer_utils.convert_object_to_bytearray(model))
    return variants


def channel_ranges(model, batches: list[np.ndarray], tensors: list[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """The least and largest value of each channel (the last axis) of each tensor over the batches."""
    ranges: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for values in tensor_values(model, batches, tensors):
        for tensor, value in values.items():
            flat = value.reshape(-1, value.shape[-1])
            least, largest = flat.min(0), flat.max(0)
            if tensor in ranges:
                least, largest = np.minimum(ranges[tensor][0], least), np.maximum(ranges[tensor][1], largest)
            ranges[tensor] = (least, largest)
    return ranges


def _above(count: int, percentile: float) -> int:
    """How many of `count` values lie at or above the percentile: at least one, the largest."""
    return max(1, int(np.ceil(count * (100.0 - percentile) / 100.0)))


def _largest(values: np.ndarray, count: int) -> np.ndarray:
    return values if values.size <= count else np.partition(values, values.size - count)[values.size - count :]


def quantized_backbone(backbone: Backbone, calibration: list[dict], cache_dir: Path) -> Backbone:
    """The backbone as a full-integer LiteRT model calibrated on `calibration` (manifest rows of
    training images), converted once per backbone, image size and calibration set: the Backbone
    whose features the `litert-int8` engine computes."""
    hashes = sorted(row["sha256"] for row in calibration)
    digest = hashlib.sha256(
        json.dumps([backbone.fingerprint, backbone.image_size, hashes, QUANTIZED_BACKBONE_VERSION]).encode()
    )
    fingerprint = f"{backbone.fingerprint}-int8-{digest.hexdigest()[:12]}"
    path = Path(cache_dir) / "litert" / f"{fingerprint}-{backbone.image_size}px.tflite"
    record = path.with_suffix(".json")
    if not intact_litert_model(path, record, "quantized LiteRT backbone", "the backbone is quantized again"):
        flatbuffer = _convert_backbone(backbone, _calibration_images(calibration, backbone.image_size))
        with atomic_path(path) as temporary:
            temporary.write_bytes(flatbuffer)
        write_json_atomic(record, model_record(flatbuffer))
    return dataclasses.replace(backbone, fingerprint=fingerprint, litert_model=path)


def _calibration_images(rows: list[dict], image_size: int) -> list[np.ndarray]:
    """The images as the extraction engine takes them (float32 in [0, 1], shrunk to fit, one per
    batch), decoded as extraction decodes them: files no longer holding the content they were
    listed with are left out."""
    images = [
        image[np.newaxis]
        for decoded in decoded_batches(
            [row["path"] for row in rows], image_size, CALIBRATION_DECODE_BATCH, [row["sha256"] for row in rows]
        )
        for image in decoded.images
    ]
    if len(images) < MINIMUM_CALIBRATION_IMAGES:
        raise HeadstartError(
            f"the int8 engine calibrates on training images, and only {len(images)} were usable "
            f"(at least {MINIMUM_CALIBRATION_IMAGES} are needed)"
        )
    return images


def _convert_backbone(backbone: Backbone, images: list[np.ndarray]) -> bytes:
    from headstart.backbone.hub_module import litert_function
    from headstart.infra.keras import tf
    from headstart.infra.native_logs import native_notices_dropped

    module = tf.saved_model.load(str(backbone.module_path))
    converter = tf.lite.TFLiteConverter.from_concrete_functions([litert_function(module, backbone.image_size)], module)
    try:
        with native_notices_dropped(), native_notices_dropped(1):
            return full_integer(converter, lambda: iter(images))[RANGE_ENDS[0]]
    except Exception as error:  # Conversion failures come from deep inside the converter, in many types.
        raise HeadstartError(
            f"backbone {backbone.handle} could not be quantized to int8: {first_line(error)}"
        ) from None
