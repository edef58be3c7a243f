"""The one place that picks the Keras implementation.

TensorFlow Hub's `KerasLayer` is a tf_keras (Keras 2) layer and breaks inside Keras 3 models, so
every model in headstart is built with tf_keras, imported from here. TensorFlow's own `tf.keras`
is made that same tf_keras too, so that Keras 3 is never imported as well: that import is a large
share of a one-image predict (benchmarks/results/speed-tricks.md).
"""

import os
import sys
import warnings
from contextlib import contextmanager

from headstart.infra.native_logs import native_notices_dropped


@contextmanager
def _legacy_keras_for_tensorflow():
    """TF_USE_LEGACY_KERAS=1 while TensorFlow is imported and `tf.keras` first resolved (which
    tensorflow_hub's import does): the two moments TensorFlow reads it. The environment is left
    as it was found, and a value the user set is respected."""
    if "TF_USE_LEGACY_KERAS" in os.environ:
        yield
        return
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    try:
        yield
    finally:
        os.environ.pop("TF_USE_LEGACY_KERAS", None)


# tensorflow_hub first tries the load context of standalone Keras 2, which Keras 3 lacks: the
# attempt imports all of Keras 3 (and matplotlib with it) before falling back to tf_keras's, a
# large share of a one-image predict (benchmarks/results/speed-tricks.md). A None entry makes that
# import fail at once (ModuleNotFoundError, without importing `keras`); hub then uses tf_keras's,
# the one our models need.
sys.modules.setdefault("keras.saving.legacy.saved_model", None)

# Before TensorFlow first logs; a level the user set is respected.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

with _legacy_keras_for_tensorflow(), native_notices_dropped(), warnings.catch_warnings():
    # tensorflow_hub's import of pkg_resources warns of its deprecation, which no user can act on.
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
    import tensorflow as tf
    import tensorflow_hub as hub
    import tf_keras as keras

    tf.config.list_physical_devices("GPU")  # CUDA's probe, and its notice, now rather than at the first op

__all__ = ["tf", "hub", "keras"]
