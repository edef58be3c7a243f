"""The float weights of a TFLite model (a tflite ModelT, as the converter's flatbuffer_utils reads
it), read and replaced in place: what equalization and rounding change before int8 quantization;
and the values its tensors take on given inputs, which they and the range measurement read."""

from __future__ import annotations

from typing import Iterator

import numpy as np
from ai_edge_litert.schema_py_generated import BuiltinOperator, TensorType


def buffer_holders(model) -> dict[int, int]:
    """Buffer → how many tensors hold it (a buffer two tensors share cannot change for one alone)."""
    holders: dict[int, int] = {}
    for tensor in model.subgraphs[0].tensors:
        holders[tensor.buffer] = holders.get(tensor.buffer, 0) + 1
    return holders


def owns_weights(model, operators, holders: dict[int, int]) -> bool:
    """Whether each filter and bias of the operators is float32 data in a buffer no other tensor
    holds (`holders`: from buffer_holders)."""
    graph = model.subgraphs[0]
    weights = [tensor for operator in operators for tensor in operator.inputs[1:3] if tensor >= 0]
    return all(
        graph.tensors[tensor].type == TensorType.FLOAT32
        and model.buffers[graph.tensors[tensor].buffer].data is not None
        and holders[graph.tensors[tensor].buffer] == 1
        for tensor in weights
    )


def operator_kind(model, operator) -> int:
    """The operator's tflite BuiltinOperator code."""
    return model.operatorCodes[operator.opcodeIndex].builtinCode


def fused_activation(operator) -> int | None:
    """The operator's fused tflite ActivationFunctionType; None for an operator without one."""
    return getattr(operator.builtinOptions, "fusedActivationFunction", None)


def is_depthwise(model, operator) -> bool:
    """Whether the operator is a depthwise convolution, whose filter [1, height, width, channels]
    has its output channels last (a CONV_2D filter [out, height, width, in] has them first)."""
    return operator_kind(model, operator) == BuiltinOperator.DEPTHWISE_CONV_2D


def weights(model, tensor: int) -> np.ndarray:
    description = model.subgraphs[0].tensors[tensor]
    return np.frombuffer(bytes(model.buffers[description.buffer].data), np.float32).reshape(description.shape)


def set_weights(model, tensor: int, values: np.ndarray) -> None:
    model.buffers[model.subgraphs[0].tensors[tensor].buffer].data = np.frombuffer(
        values.astype(np.float32).tobytes(), np.uint8
    )


def tensor_values(model, batches: list[np.ndarray], tensors: list[int]) -> Iterator[dict[int, np.ndarray]]:
    """The values of `tensors` as the float model (a tflite ModelT) computes them, batch by batch."""
    import os
    import warnings

    from ai_edge_litert.interpreter import Interpreter
    from tensorflow.lite.tools import flatbuffer_utils

    with warnings.catch_warnings():  # keeping every tensor is the point here, not a debugging slip
        warnings.simplefilter("ignore", UserWarning)
        interpreter = Interpreter(
            model_content=bytes(flatbuffer_utils.convert_object_to_bytearray(model)),
            experimental_preserve_all_tensors=True,
            num_threads=os.cpu_count() or 1,
        )
    index, shape = interpreter.get_input_details()[0]["index"], None
    for batch in batches:
        if batch.shape != shape:
            interpreter.resize_tensor_input(index, batch.shape)
            interpreter.allocate_tensors()
            shape = batch.shape
        interpreter.set_tensor(index, batch.astype(np.float32))
        interpreter.invoke()
        yield {tensor: interpreter.get_tensor(tensor) for tensor in tensors}
