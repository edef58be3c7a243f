"""The one place that picks the Keras implementation.

TensorFlow Hub's `KerasLayer` is a tf_keras (Keras 2) layer and breaks inside Keras 3 models, so
every model in headstart is built with tf_keras, imported from here. TF_USE_LEGACY_KERAS makes
TensorFlow's own `tf.keras` that same tf_keras instead of importing Keras 3 as well, which took
2.5 s of every run's start-up.
"""

import os
import sys

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
# tensorflow_hub first tries the load context of standalone Keras 2, which Keras 3 lacks: the
# attempt imported all of Keras 3 (and matplotlib with it), 0.3–0.5 s of every hub layer load,
# before falling back to tf_keras's. A None entry makes that import fail at once
# (ModuleNotFoundError, without importing `keras`); hub then uses tf_keras's, the one our models need.
sys.modules.setdefault("keras.saving.legacy.saved_model", None)

import tensorflow as tf  # noqa: E402 (after the switch above)
import tensorflow_hub as hub  # noqa: E402
import tf_keras as keras  # noqa: E402

__all__ = ["tf", "hub", "keras"]
