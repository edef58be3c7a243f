"""A network exported as a TF Hub image feature-vector module, its preprocessing baked in.

The module takes float32 RGB images in [0, 1] of any size, resizes them to its own size and
normalises them with ImageNet's mean and std before the network: every consumer (hub.KerasLayer,
the LiteRT conversion, a user's own code) then feeds it plain pixels.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from headstart.data.preprocessing import enlarge_images, imagenet_normalization, resize_images
from headstart.infra.keras import keras, tf

# The signature of headstart's modules that LiteRT converts: images no larger than the module's
# size, enlarged with a plain bilinear resize (all that antialiasing amounts to when no side
# shrinks), which LiteRT has.
LITERT_SIGNATURE = "litert"
# The signature (and function) of headstart's modules that returns the network's last feature map,
# [batch, h, w, channels] before global pooling: what class activation maps are computed on.
FEATURE_MAP_SIGNATURE = "feature_map"


def build_hub_module(network: keras.Model, image_size: int, mirror_average: bool = False):
    """Wraps the network as a TF Hub image feature-vector module.

    The reusable-SavedModel convention: `__call__(images)` takes float32 images in [0, 1] of
    any size and returns [batch, 1280]; `variables`, `trainable_variables` and
    `regularization_losses` let `hub.KerasLayer(..., trainable=True)` fine-tune it later.
    `__call__` takes no `training` argument, which the convention allows: the network behaves
    the same either way (its BatchNorm is folded into fixed ImageNet statistics, which a small
    new dataset would only wreck), and each traced variant would be one more copy of the network
    for every load to restore.

    With `mirror_average`, the features of each image are the mean of the network's features of
    the image and of its mirror image: a head on top sees both orientations (for a linear head,
    the mean of its two logits), at twice the network's work per image.

    Where the network ends in global average pooling, the module also exports `feature_map` (a
    function and a signature of that name): the same images → the map that pooling averages,
    [batch, h, w, channels]; with `mirror_average`, the mean of the image's map and of its
    mirror image's map flipped back, so that the map's spatial mean is `__call__`'s features.
    """
    module = tf.__internal__.tracking.AutoTrackable()
    # The Keras network itself is not attached: saving it would serialise (and trace) every layer,
    # which export, every load and hub.KerasLayer would then read back. The functions and the
    # variable lists below are all a hub module needs.
    normalize = imagenet_normalization()

    def features(images):
        normalized = normalize(images)
        if not mirror_average:
            return network(normalized, training=False)
        return (network(normalized, training=False) + network(tf.reverse(normalized, axis=[2]), training=False)) / 2

    @tf.function
    def call(images):
        return features(resize_images(images, image_size))

    # A separate function for LiteRT: the antialiased resize in `call` has no LiteRT counterpart.
    @tf.function
    def call_for_litert(images):
        return features(enlarge_images(images, image_size))

    images_spec = tf.TensorSpec([None, None, None, 3], tf.float32)
    call.get_concrete_function(images_spec)
    feature_map = _feature_map_function(network, image_size, normalize, mirror_average)
    if feature_map is not None:
        feature_map.get_concrete_function(images_spec)
        module.feature_map = feature_map
    module.__call__ = call
    module.image_size = tf.Variable(image_size, trainable=False, name="image_size")
    module.variables = list(network.variables)
    module.trainable_variables = list(network.trainable_variables)
    module.regularization_losses = []
    module.signatures_to_export = {
        "serving_default": call.get_concrete_function(images_spec),
        LITERT_SIGNATURE: call_for_litert.get_concrete_function(images_spec),
    }
    if feature_map is not None:
        module.signatures_to_export[FEATURE_MAP_SIGNATURE] = feature_map.get_concrete_function(images_spec)
    return module


def _feature_map_function(network: keras.Model, image_size: int, normalize, mirror_average: bool):
    """A tf.function images in [0, 1] → the network's last map before its global average pooling
    (resized and normalised as `__call__` does it); None for a network that does not end in one."""
    pooling = network.layers[-1]
    if not isinstance(pooling, keras.layers.GlobalAveragePooling2D) or pooling.data_format != "channels_last":
        return None
    # The same layers, so the same variables: the module saves them once.
    unpooled = keras.Model(network.inputs, pooling.input, name=f"{network.name}_feature_map")

    @tf.function
    def feature_map(images):
        normalized = normalize(resize_images(images, image_size))
        maps = unpooled(normalized, training=False)
        if not mirror_average:
            return maps
        mirrored = unpooled(tf.reverse(normalized, axis=[2]), training=False)
        return (maps + tf.reverse(mirrored, axis=[2])) / 2

    return feature_map


def export_hub_module(network: keras.Model, image_size: int, destination: Path, mirror_average: bool = False) -> Path:
    """Writes the network as a TF Hub reusable SavedModel, atomically (temp dir + rename)."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=destination.parent))
    try:
        module = build_hub_module(network, image_size, mirror_average)
        tf.saved_model.save(module, str(staging), signatures=module.signatures_to_export)
        if destination.exists():
            shutil.rmtree(staging)
        else:
            os.replace(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return destination


def litert_function(module, image_size: int):
    """The concrete function of a loaded module that LiteRT converts: headstart's own LiteRT
    signature where the module exports one, otherwise its serving signature behind a plain
    bilinear resize to exactly its size."""
    if LITERT_SIGNATURE in module.signatures:
        return module.signatures[LITERT_SIGNATURE]
    serving = module.signatures["serving_default"]

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    def resize_and_extract(images):
        return serving(enlarge_images(images, image_size))

    return resize_and_extract.get_concrete_function()
