"""The one place that picks the Keras implementation.

TensorFlow Hub's `KerasLayer` is a tf_keras (Keras 2) layer and breaks inside Keras 3 models, so
every model in headstart is built with tf_keras, imported from here.
"""

import tensorflow as tf
import tensorflow_hub as hub
import tf_keras as keras

__all__ = ["tf", "hub", "keras"]
