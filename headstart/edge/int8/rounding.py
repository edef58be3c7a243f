"""Int8 weights rounded so that their errors cancel on the calibration images, not each to its
nearest step (GPTQ: Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", 2022, after Optimal Brain Quantization).

Rounding every weight to its nearest int8 step leaves each within half a step, but a convolution's
output moves by the sum of the errors times its inputs, and where the inputs move together those
errors add up. MobileNetV2 sees enlarged, smooth images: a 3×3 depthwise filter mostly meets
nearly constant patches, so what counts is the sum of its taps, and nine errors of up to half a
step each shift it. Here, before the converter quantizes, each filter's weights are put on the
int8 grid the converter will use (per output channel, its largest |weight| over 127 steps) one
input position at a time, each rounding error spread over the weights not rounded yet in
proportion to how the layer's inputs co-vary on the calibration images (H = Σ x xᵀ), so the
output on those inputs moves as little as it can. The converter then finds every weight already
on its grid and keeps it.
"""

from __future__ import annotations

import numpy as np
from ai_edge_litert.schema_py_generated import BuiltinOperator, Padding

from headstart.edge.int8.tflite_weights import (
    buffer_holders,
    is_depthwise,
    operator_kind,
    owns_weights,
    set_weights,
    tensor_values,
    weights,
)

INT8_STEPS = 127  # per-channel int8 weights are symmetric: −127 … 127 steps
# Added to the diagonal of H, as a share of its mean, so that inputs that never varied on the
# calibration images still give a matrix that inverts (GPTQ's own choice).
DAMPING = 0.01


def round_compensating(model, batches: list[np.ndarray]) -> int:
    """Puts the float weights of every convolution of the model (a tflite ModelT with float weights)
    on its int8 grid, rounded so that their errors cancel on the batches; returns how many
    convolutions changed."""
    operators = _convolutions(model)
    if not operators:
        return 0
    products = _input_products(model, batches, operators)
    for operator in operators:
        filters = weights(model, operator.inputs[1])
        depthwise = is_depthwise(model, operator)
        # One row per output channel, one column per input position: [out, h·w·in] for CONV_2D;
        # a depthwise filter [1, h, w, channels] is one row of h·w taps per channel.
        rows = filters.reshape(-1, filters.shape[3]).T if depthwise else filters.reshape(filters.shape[0], -1)
        rounded = round_rows(rows.astype(np.float64), products[id(operator)])
        set_weights(
            model, operator.inputs[1], rounded.T.reshape(filters.shape) if depthwise else rounded.reshape(filters.shape)
        )
    return len(operators)


def round_rows(rows: np.ndarray, products: np.ndarray) -> np.ndarray:
    """Rows of weights [rows, columns] on their int8 grids (step: the row's largest |weight| / 127),
    column by column, each column's rounding error compensated in the columns after it through the
    inverse of `products` ([columns, columns], shared, or [rows, columns, columns], one per row).
    A row's largest weight stays at its 127 steps, so the grid the converter derives is this one."""
    steps = np.abs(rows).max(axis=1) / INT8_STEPS
    live = steps > 0
    steps = np.where(live, steps, 1.0)
    size = products.shape[-1]
    damped = products + (
        DAMPING * np.diagonal(products, axis1=-2, axis2=-1).mean(axis=-1)[..., None, None] + 1e-12
    ) * np.eye(size)
    # The upper Cholesky factor of H⁻¹ gives each column's compensation of the columns after it.
    inverse = np.linalg.cholesky(np.linalg.inv(damped)).swapaxes(-1, -2)
    shared = inverse.ndim == 2
    largest = np.abs(rows).argmax(axis=1)
    every = np.arange(len(rows))
    remaining, rounded = rows.copy(), np.empty_like(rows)
    for column in range(size):
        values = remaining[:, column]
        rounded[:, column] = np.clip(np.round(values / steps), -INT8_STEPS, INT8_STEPS) * steps
        pivot, after = (
            (inverse[column, column], inverse[column, column + 1 :][None])
            if shared
            else (inverse[:, column, column], inverse[:, column, column + 1 :])
        )
        remaining[:, column + 1 :] -= ((values - rounded[:, column]) / pivot)[:, None] * after
    # The largest weight goes back to its own 127 steps, whatever the compensation made of it. Set
    # back at its turn instead, with the difference compensated after it, the int8 file came out
    # further from the float model (README, "On phones and boards").
    rounded[every, largest] = rows[every, largest]
    return np.where(live[:, None], rounded, rows)


def _convolutions(model) -> list:
    """The CONV_2D and depthwise operators whose float filters this can round: undilated, one output
    channel per input channel where depthwise, filters held by no other operator."""
    kinds = (BuiltinOperator.CONV_2D, BuiltinOperator.DEPTHWISE_CONV_2D)
    holders, graph = buffer_holders(model), model.subgraphs[0]
    found = []
    for operator in graph.operators:
        if operator_kind(model, operator) not in kinds or not owns_weights(model, [operator], holders):
            continue
        options = operator.builtinOptions
        if (options.dilationHFactor, options.dilationWFactor) != (1, 1) or getattr(
            options, "depthMultiplier", 1
        ) not in (0, 1):
            continue
        found.append(operator)
    return found


def _input_products(model, batches: list[np.ndarray], operators: list) -> dict[int, np.ndarray]:
    """For each operator (by id), Σ x xᵀ over the input patches its filter meets on the batches:
    [h·w·in, h·w·in] for CONV_2D, [channels, h·w, h·w] for depthwise."""
    products: dict[int, np.ndarray] = {}
    for values in tensor_values(model, batches, sorted({operator.inputs[0] for operator in operators})):
        for operator in operators:
            shape = model.subgraphs[0].tensors[operator.inputs[1]].shape
            patches = _patches(values[operator.inputs[0]], operator, shape[1], shape[2]).astype(np.float32, copy=False)
            # One image's products in float32 (BLAS), summed over the images in float64.
            if is_depthwise(model, operator):
                taps = patches.reshape(-1, shape[1] * shape[2], patches.shape[-1]).transpose(
                    2, 1, 0
                )  # [channels, h·w, positions]
                product = np.matmul(taps, taps.transpose(0, 2, 1))
            else:
                flat = patches.reshape(-1, shape[1] * shape[2] * patches.shape[-1])
                product = flat.T @ flat
            products[id(operator)] = products.get(id(operator), 0) + product.astype(np.float64)
    return products


def _patches(inputs: np.ndarray, operator, height: int, width: int) -> np.ndarray:
    """The input patches a filter of height × width meets: [n, out_h, out_w, height, width, channels],
    with the operator's strides and padding (SAME pads with zeros as TFLite does, more after than before)."""
    options = operator.builtinOptions
    stride_h, stride_w = options.strideH, options.strideW
    n, rows, columns, channels = inputs.shape
    if (height, width, stride_h, stride_w) == (1, 1, 1, 1):
        return inputs[:, :, :, np.newaxis, np.newaxis, :]
    if options.padding == Padding.SAME:
        out_h, out_w = -(-rows // stride_h), -(-columns // stride_w)
        pad_h, pad_w = max((out_h - 1) * stride_h + height - rows, 0), max((out_w - 1) * stride_w + width - columns, 0)
        inputs = np.pad(inputs, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
    else:
        out_h, out_w = (rows - height) // stride_h + 1, (columns - width) // stride_w + 1
    patches = np.empty((n, out_h, out_w, height, width, channels), inputs.dtype)
    for i in range(height):
        for j in range(width):
            patches[:, :, :, i, j, :] = inputs[
                :, i : i + stride_h * (out_h - 1) + 1 : stride_h, j : j + stride_w * (out_w - 1) + 1 : stride_w, :
            ]
    return patches
