"""Cross-layer equalization of a float TFLite model before int8 quantization (Nagel et al., "Data-Free
Quantization Through Weight Equalization and Bias Correction", 2019), where it changes nothing the
model computes.

An int8 activation tensor has one scale for all its channels, set by its widest channel: a channel
whose values stay ten times smaller is resolved by a tenth of the 256 steps. Where each channel of
a tensor can be multiplied by its own factor s and the operations reading it divide by s again,
every channel is scaled up until it reaches as far as the widest one (never further: the tensor's
range, and so its step, stays). The writing convolutions' filters and biases are multiplied by s,
the reading convolutions' filters divided by s for that input channel. Two kinds of tensors allow it:

- a convolution's output that goes (through zero padding at most) only into a depthwise
  convolution: the depthwise filter is quantized per channel, so dividing it loses nothing, and a
  ReLU or ReLU6 after the first convolution gives the same values scaled, since no channel is scaled
  past the widest one's range (ReLU6's 6 at most). In MobileNetV2: the stem and every expansion.
- tensors no activation separates, read only by convolutions: a projection's output and the
  residual sums over it, with every projection writing into those sums scaled alike. The reading
  (expansion) convolutions' filters are quantized per output channel, so a divided input column
  keeps fewer of its row's steps; their rounding (headstart.edge.int8.rounding) weighs that against the
  activation steps gained.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ai_edge_litert.schema_py_generated import ActivationFunctionType, BuiltinOperator

from headstart.edge.int8.tflite_weights import (
    buffer_holders,
    fused_activation,
    is_depthwise,
    operator_kind,
    owns_weights,
    set_weights,
    weights,
)

# Fused activations under which a channel scaled up by s stays s times the value (ReLU6 within the
# widest channel's range).
SCALE_PRESERVING_ACTIVATIONS = {
    ActivationFunctionType.NONE,
    ActivationFunctionType.RELU,
    ActivationFunctionType.RELU6,
}
# A channel nearly silent on the calibration images is scaled up at most this much (4 more bits), so
# that larger values it takes on other images are not clipped at its few calibration values.
MAXIMUM_CHANNEL_SCALE = 16.0


@dataclass(frozen=True)
class ScalableChannels:
    """Tensors whose channels can be scaled together: each channel of every one of them by the same
    factor, through the `producers` (convolutions writing them) and the `readers` (convolutions or
    depthwise convolutions reading them as their input)."""

    tensors: tuple[int, ...]
    producers: tuple  # tflite OperatorT
    readers: tuple


def scalable_channels(model) -> list[ScalableChannels]:
    """The groups of tensors of the model (a tflite ModelT with float weights) whose channels can be scaled."""
    graph = _Graph(model)
    groups = [*graph.into_depthwise(), *graph.linear_sums()]
    holders = buffer_holders(model)
    return [group for group in groups if owns_weights(model, [*group.producers, *group.readers], holders)]


def equalize(model, groups: list[ScalableChannels], channel_ranges: dict[int, tuple[np.ndarray, np.ndarray]]) -> int:
    """Scales each group's channels (in the model's weight buffers) so that each reaches as far as
    the tensors' widest channels did on the calibration images (`channel_ranges`: tensor → least
    and largest value per channel), without widening any tensor's range; returns how many groups
    changed."""
    changed = 0
    for group in groups:
        scales = np.clip(_room(group.tensors, channel_ranges), 1.0, MAXIMUM_CHANNEL_SCALE)
        if np.all(scales == 1.0):
            continue
        for producer in group.producers:
            set_weights(
                model,
                producer.inputs[1],
                weights(model, producer.inputs[1])
                * (scales if is_depthwise(model, producer) else scales[:, None, None, None]),
            )
            if len(producer.inputs) > 2 and producer.inputs[2] >= 0:
                set_weights(model, producer.inputs[2], weights(model, producer.inputs[2]) * scales)
        for reader in group.readers:  # either kind of filter has its input channels last
            set_weights(model, reader.inputs[1], weights(model, reader.inputs[1]) / scales)
        changed += 1
    return changed


def _room(tensors, channel_ranges) -> np.ndarray:
    """How far each channel can be scaled before it reaches out of one of the tensors' ranges."""
    room = None
    for tensor in tensors:
        least, largest = channel_ranges[tensor]
        limits = np.full(largest.shape, np.inf)
        np.minimum(
            limits, np.divide(largest.max(), largest, out=np.full(limits.shape, np.inf), where=largest > 0), out=limits
        )
        np.minimum(
            limits, np.divide(least.min(), least, out=np.full(limits.shape, np.inf), where=least < 0), out=limits
        )
        room = limits if room is None else np.minimum(room, limits)
    return room


class _Graph:
    """Who writes and who reads each tensor of a tflite model's main graph."""

    def __init__(self, model):
        self.model, self.graph, self.kinds = model, model.subgraphs[0], BuiltinOperator
        self.writer = {operator.outputs[0]: operator for operator in self.graph.operators}
        self.readers: dict[int, list] = {}
        for operator in self.graph.operators:
            for position, tensor in enumerate(operator.inputs):
                self.readers.setdefault(tensor, []).append((operator, position))

    def kind(self, operator) -> int:
        return operator_kind(self.model, operator)

    def only_reader(self, tensor: int):
        readers = self.readers.get(tensor, ())
        return readers[0] if len(readers) == 1 and tensor not in self.graph.outputs else (None, None)

    def into_depthwise(self) -> list[ScalableChannels]:
        """Convolutions whose output goes (through zero padding at most) only into a depthwise convolution."""
        groups = []
        for producer in self.graph.operators:
            if (
                self.kind(producer) not in (self.kinds.CONV_2D, self.kinds.DEPTHWISE_CONV_2D)
                or fused_activation(producer) not in SCALE_PRESERVING_ACTIVATIONS
            ):
                continue
            consumer, position = self.only_reader(producer.outputs[0])
            if (
                consumer is not None and self.kind(consumer) == self.kinds.PAD and position == 0
            ):  # zeros scaled stay zeros
                consumer, position = self.only_reader(consumer.outputs[0])
            if (
                consumer is not None
                and self.kind(consumer) == self.kinds.DEPTHWISE_CONV_2D
                and position == 0
                and self._input_channels(consumer) == self._channels(producer)
            ):
                groups.append(ScalableChannels((producer.outputs[0],), (producer,), (consumer,)))
        return groups

    def linear_sums(self) -> list[ScalableChannels]:
        """Outputs of convolutions without activation joined by the sums (ADD without activation)
        over them, where every tensor of the group is written by one of those convolutions or sums
        and read only by them or as a convolution's input."""
        linear = lambda operator: fused_activation(operator) == ActivationFunctionType.NONE  # noqa: E731
        sums = [
            operator for operator in self.graph.operators if self.kind(operator) == self.kinds.ADD and linear(operator)
        ]
        joined: dict[int, int] = {}

        def root(tensor: int) -> int:
            while joined.get(tensor, tensor) != tensor:
                tensor = joined[tensor]
            return tensor

        for operator in sums:
            for tensor in operator.inputs[:2]:
                joined[root(tensor)] = root(operator.outputs[0])
        members: dict[int, set[int]] = {}
        written = (
            operator.outputs[0] for operator in self.graph.operators if self.kind(operator) == self.kinds.CONV_2D
        )
        for tensor in {*joined, *(operator.outputs[0] for operator in sums), *written}:
            members.setdefault(root(tensor), set()).add(tensor)
        groups = []
        for tensors in members.values():
            writers = [self.writer.get(tensor) for tensor in tensors]
            reading = [pair for tensor in tensors for pair in self.readers.get(tensor, [])]
            convolutions = [
                writer for writer in writers if writer is not None and self.kind(writer) == self.kinds.CONV_2D
            ]
            readers = [
                operator
                for operator, position in reading
                if self.kind(operator) == self.kinds.CONV_2D and position == 0
            ]
            if (
                convolutions
                and not any(tensor in self.graph.outputs for tensor in tensors)
                and all(
                    writer is not None and linear(writer) and self.kind(writer) in (self.kinds.CONV_2D, self.kinds.ADD)
                    for writer in writers
                )
                and all(
                    (self.kind(operator) == self.kinds.CONV_2D and position == 0) or operator.outputs[0] in tensors
                    for operator, position in reading
                )
                and all(self._input_channels(reader) == self._channels(convolutions[0]) for reader in readers)
            ):
                groups.append(ScalableChannels(tuple(sorted(tensors)), tuple(convolutions), tuple(readers)))
        return groups

    def _channels(self, producer) -> int:
        return self.graph.tensors[producer.outputs[0]].shape[-1]

    def _input_channels(self, reader) -> int:
        """The input channels a reader's filter has (its last axis, for either kind of convolution)."""
        return self.graph.tensors[reader.inputs[1]].shape[-1]
