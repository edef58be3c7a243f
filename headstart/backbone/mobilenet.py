"""torchvision's MobileNetV2, rebuilt layer for layer in Keras: normalised images → 1280 features.

The network computes exactly what torchvision computes (parity ≤ 1e-4 with torch's own outputs,
see tests/test_backbone.py): BatchNorm in inference mode with epsilon 1e-5 (folded into the
convolution before it), symmetric (k-1)//2 zero padding before every 3×3 convolution, ReLU6,
residual adds where stride is 1 and channels match, global average pooling to 1280 features.
Its input is already normalised with ImageNet's mean and std (see headstart.data.preprocessing).
"""

from __future__ import annotations

import numpy as np

from headstart.backbone.stages import HEAD, STEM, blocks, channels_into
from headstart.infra.keras import keras

FEATURE_DIM = 1280
BATCH_NORM_EPSILON = 1e-5  # torch's default; Keras' default of 1e-3 would shift every feature.


def _conv_bn(x, state, prefix, filters, kernel_size, stride, depthwise, relu6, name):
    """A convolution and the BatchNorm after it, folded into one convolution with a bias."""
    if kernel_size > 1:
        # torch pads (k-1)//2 on every side; Keras 'same' pads asymmetrically at stride 2.
        x = keras.layers.ZeroPadding2D((kernel_size - 1) // 2, name=f"{name}_pad")(x)
    scale, shift = _folded_batch_norm(state, f"{prefix}.1")
    if depthwise:
        conv = keras.layers.DepthwiseConv2D(kernel_size, strides=stride, name=f"{name}_dw")
        x = conv(x)
        kernel = state[f"{prefix}.0.weight"].transpose(2, 3, 0, 1) * scale[:, np.newaxis]
    else:
        conv = keras.layers.Conv2D(filters, kernel_size, strides=stride, name=f"{name}_conv")
        x = conv(x)
        kernel = state[f"{prefix}.0.weight"].transpose(2, 3, 1, 0) * scale
    conv.set_weights([kernel.astype(np.float32), shift])
    if relu6:
        x = keras.layers.ReLU(6.0, name=f"{name}_relu6")(x)
    return x


def _folded_batch_norm(state, prefix) -> tuple[np.ndarray, np.ndarray]:
    """BatchNorm in inference mode as a per-channel (scale, shift), computed in float64.

    The backbone only ever runs BatchNorm on its stored ImageNet statistics, where it is this
    affine map; folded into the convolution before it, it costs no operations and no variables
    of its own (262 variables became 104, which every export, load and save of a model handles).
    """
    gamma, beta, mean, variance = (
        state[f"{prefix}.{key}"].astype(np.float64) for key in ("weight", "bias", "running_mean", "running_var")
    )
    scale = gamma / np.sqrt(variance + BATCH_NORM_EPSILON)
    return scale, (beta - mean * scale).astype(np.float32)


def _inverted_residual(x, state, index, expansion, in_channels, channels, stride):
    block_input, prefix, name = x, f"features.{index}.conv", f"block{index}"
    layer = 0
    if expansion != 1:
        x = _conv_bn(x, state, f"{prefix}.0", in_channels * expansion, 1, 1, False, True, f"{name}_expand")
        layer = 1
    x = _conv_bn(x, state, f"{prefix}.{layer}", None, 3, stride, True, True, f"{name}_depthwise")
    project = keras.layers.Conv2D(channels, 1, name=f"{name}_project_conv")
    x = project(x)
    scale, shift = _folded_batch_norm(state, f"{prefix}.{layer + 2}")
    project.set_weights(
        [(state[f"{prefix}.{layer + 1}.weight"].transpose(2, 3, 1, 0) * scale).astype(np.float32), shift]
    )
    if stride == 1 and in_channels == channels:
        x = keras.layers.Add(name=f"{name}_add")([block_input, x])
    return x


def _stages(x, state, first: int, last: int):
    """Stages first…last (inclusive) of the network applied to x; the pooling after HEAD."""
    if first == STEM:
        x = _conv_bn(x, state, "features.0", 32, 3, 2, False, True, "stem")
    for index, expansion, in_channels, channels, stride in blocks():
        if first <= index <= last:
            x = _inverted_residual(x, state, index, expansion, in_channels, channels, stride)
    if last == HEAD:
        x = _conv_bn(x, state, "features.18", FEATURE_DIM, 1, 1, False, True, "head")
        x = keras.layers.GlobalAveragePooling2D(name="global_pool")(x)
    return x


def build_mobilenet_v2(state: dict[str, np.ndarray]) -> keras.Model:
    """Builds torchvision's MobileNetV2 feature extractor in Keras: normalised images → 1280 features."""
    inputs = keras.Input((None, None, 3), name="normalized_images")
    return keras.Model(inputs, _stages(inputs, state, STEM, HEAD), name="mobilenet_v2_torchvision")


def build_mobilenet_v2_split(state: dict[str, np.ndarray], cut: int) -> tuple[keras.Model, keras.Model]:
    """The same network in two parts, cut before stage `cut` (1–18): normalised images → the
    activations entering that stage, and those activations → 1280 features. Run one after the
    other they compute what build_mobilenet_v2 computes; the upper part is what fine-tuning
    trains, on activations of the lower part computed once."""
    images = keras.Input((None, None, 3), name="normalized_images")
    lower = keras.Model(images, _stages(images, state, STEM, cut - 1), name=f"mobilenet_v2_below_{cut}")
    activations = keras.Input((None, None, channels_into(cut)), name=f"activations_into_{cut}")
    upper = keras.Model(activations, _stages(activations, state, cut, HEAD), name=f"mobilenet_v2_from_{cut}")
    return lower, upper


def imagenet_classifier(state: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The checkpoint's 1000-class ImageNet classifier as (kernel [1280, 1000], bias [1000])."""
    return state["classifier.1.weight"].T.copy(), state["classifier.1.bias"].copy()
