"""Full-integer int8: weights and activations in 8 bits, calibrated on the user's own training images.

Two things are quantized this way: the frozen backbone, as the `litert-int8` feature-extraction
engine (`quantized_backbone`), and the whole classifier, as an int8 `.tflite` export
(headstart.export). Both use the TFLite converter's post-training quantization: int8 weights per
output channel, int8 activations whose ranges are the minimum and maximum each tensor reaches on
the representative images.

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
# Bump when the conversion changes: quantized backbones and their features are then made anew.
QUANTIZED_BACKBONE_VERSION = 1


def representative_rows(rows: Iterable[dict]) -> list[dict]:
    """Manifest rows (path, label, sha256, split) of up to REPRESENTATIVE_IMAGES training images,
    spread evenly over the training split in content-hash order: every class in its share, and the
    same images whatever order the files were listed in."""
    train = sorted((row for row in rows if row["split"] == "train"), key=lambda row: row["sha256"])
    step = max(1, len(train) // REPRESENTATIVE_IMAGES)
    return train[::step][:REPRESENTATIVE_IMAGES]


def set_full_integer(converter, representative: Callable[[], Iterable[np.ndarray]]) -> None:
    """Makes a TFLite converter quantize weights and activations to int8 (float input and output
    stay as they are unless the caller sets their types), calibrated on the float32 batches that
    `representative()` yields."""
    from headstart.keras import tf

    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.representative_dataset = lambda: ([batch] for batch in representative())


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
    set_full_integer(converter, lambda: iter(images))
    try:
        with native_notices_dropped(), native_notices_dropped(1):
            return converter.convert()
    except Exception as error:  # Conversion failures come from deep inside the converter, in many types.
        raise HeadstartError(f"backbone {backbone.handle} could not be quantized to int8: {str(error).splitlines()[0] if str(error) else type(error).__name__}") from None
