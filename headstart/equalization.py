"""Cross-layer equalization of a float TFLite model before int8 quantization (Nagel et al., "Data-Free
Quantization Through Weight Equalization and Bias Correction", 2019), where it changes nothing the
model computes and costs no weight precision.

An int8 activation tensor has one scale for all its channels, set by its widest channel: a channel
whose values stay ten times smaller is resolved by a tenth of the 256 steps. Where a convolution's
output goes (through zero padding at most) only into a depthwise convolution, each channel can be
scaled up to the widest one: the first convolution's filter and bias for that channel are multiplied
by s, the depthwise filter of that channel is divided by s. Depthwise weights are quantized per
channel, so the division loses nothing there; a ReLU or ReLU6 after the first convolution gives the
same values scaled, since no channel is scaled past the widest one's range (ReLU6's 6 at most).
In MobileNetV2 that is every expansion and the stem, each feeding a depthwise convolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from headstart.tflite_weights import buffer_holders, owns_weights, set_weights, weights

# tflite::ActivationFunctionType values under which a channel scaled up by s stays s times the value.
SCALE_PRESERVING_ACTIVATIONS = {0, 1, 3}  # none, ReLU, ReLU6 (ReLU6 within the widest channel's range)
# A channel nearly silent on the calibration images is scaled up at most this much (4 more bits), so
# that larger values it takes on other images are not clipped at its few calibration values.
MAXIMUM_CHANNEL_SCALE = 16.0


@dataclass(frozen=True)
class DepthwisePair:
    """A convolution whose output `tensor` goes (through zero padding at most) only into `depthwise`."""

    producer: object  # tflite OperatorT
    tensor: int
    depthwise: object


def depthwise_pairs(model) -> list[DepthwisePair]:
    """The pairs of the model (a tflite ModelT with float weights) whose channels can be scaled."""
    from tensorflow.lite.python import schema_py_generated as schema

    graph, kinds = model.subgraphs[0], schema.BuiltinOperator
    kind = lambda operator: model.operatorCodes[operator.opcodeIndex].builtinCode  # noqa: E731
    readers: dict[int, list] = {}
    for operator in graph.operators:
        for position, tensor in enumerate(operator.inputs):
            readers.setdefault(tensor, []).append((operator, position))
    only_reader = lambda tensor: readers[tensor][0] if len(readers.get(tensor, ())) == 1 and tensor not in graph.outputs else (None, None)  # noqa: E731
    holders = buffer_holders(model)
    pairs = []
    for producer in graph.operators:
        if kind(producer) not in (kinds.CONV_2D, kinds.DEPTHWISE_CONV_2D) or producer.builtinOptions.fusedActivationFunction not in SCALE_PRESERVING_ACTIVATIONS:
            continue
        consumer, position = only_reader(producer.outputs[0])
        if consumer is not None and kind(consumer) == kinds.PAD and position == 0:  # zeros scaled stay zeros
            consumer, position = only_reader(consumer.outputs[0])
        if (consumer is not None and kind(consumer) == kinds.DEPTHWISE_CONV_2D and position == 0
                and owns_weights(model, [producer, consumer], holders) and weights(model, consumer.inputs[1]).shape[3] == _channels(model, producer)):
            pairs.append(DepthwisePair(producer, producer.outputs[0], consumer))
    return pairs


def equalize(model, pairs: list[DepthwisePair], channel_maxima: dict[int, np.ndarray]) -> int:
    """Scales each pair's channels (in the model's weight buffers) so that every channel of its
    tensor reaches as far as the widest one did on the calibration images (`channel_maxima`:
    tensor → largest |value| per channel); returns how many pairs changed."""
    from tensorflow.lite.python import schema_py_generated as schema

    changed = 0
    for pair in pairs:
        maxima = channel_maxima[pair.tensor]
        widest = float(maxima.max())
        scales = np.clip(np.divide(widest, maxima, out=np.ones_like(maxima), where=maxima > 0), 1.0, MAXIMUM_CHANNEL_SCALE)
        if np.all(scales == 1.0):
            continue
        producer_is_depthwise = model.operatorCodes[pair.producer.opcodeIndex].builtinCode == schema.BuiltinOperator.DEPTHWISE_CONV_2D
        # Filters are [out, height, width, in] for CONV_2D and [1, height, width, channels] for depthwise.
        set_weights(model, pair.producer.inputs[1], weights(model, pair.producer.inputs[1]) * (scales if producer_is_depthwise else scales[:, None, None, None]))
        if len(pair.producer.inputs) > 2 and pair.producer.inputs[2] >= 0:
            set_weights(model, pair.producer.inputs[2], weights(model, pair.producer.inputs[2]) * scales)
        set_weights(model, pair.depthwise.inputs[1], weights(model, pair.depthwise.inputs[1]) / scales)
        changed += 1
    return changed


def _channels(model, producer) -> int:
    return model.subgraphs[0].tensors[producer.outputs[0]].shape[-1]
