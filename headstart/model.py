"""The classifier: frozen backbone + a new Dropout → Dense head, built with the Functional API.

The end-to-end model takes raw RGB pixels (0–255, any size) and returns class probabilities.
Training never runs it, though: see `train_head`.
"""

from __future__ import annotations

import itertools

import numpy as np

from headstart.features import InMemoryFeatures, FeatureStream
from headstart.mobilenet import resize_images
from headstart.keras import keras, tf

HEAD_DROPOUT = "head_dropout"
HEAD_DENSE = "head_dense"
STEPS_PER_EXECUTION = 32


@keras.utils.register_keras_serializable(package="headstart")
class ImagePreprocessing(keras.layers.Layer):
    """Raw pixels 0–255 of any size → [0, 1] at image_size, exactly as feature extraction does it."""

    def __init__(self, image_size: int, **kwargs):
        super().__init__(**kwargs)
        self.image_size = image_size

    def call(self, images):
        return resize_images(tf.cast(images, tf.float32) / 255.0, self.image_size)

    def get_config(self):
        return {**super().get_config(), "image_size": self.image_size}


def build_classifier(backbone_layer: keras.layers.Layer, num_classes: int, image_size: int, dropout: float, seed: int) -> keras.Model:
    """Images → ImagePreprocessing → frozen backbone → Dropout → Dense(softmax)."""
    backbone_layer.trainable = False
    images = keras.Input((None, None, 3), name="images")
    pixels = ImagePreprocessing(image_size, name="preprocessing")(images)
    features = backbone_layer(pixels, training=False)
    dropped = keras.layers.Dropout(dropout, seed=seed, name=HEAD_DROPOUT)(features)
    probabilities = keras.layers.Dense(
        num_classes, activation="softmax", name=HEAD_DENSE,
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed),
    )(dropped)
    return keras.Model(images, probabilities, name="headstart_classifier")


def head_model(classifier: keras.Model, feature_dim: int) -> keras.Model:
    """The classifier's own head layers (shared, not copied) on a features input."""
    features = keras.Input((feature_dim,), name="features")
    dropped = classifier.get_layer(HEAD_DROPOUT)(features)
    return keras.Model(features, classifier.get_layer(HEAD_DENSE)(dropped), name="head")


def train_head(
    classifier: keras.Model,
    train: "FeatureStream | InMemoryFeatures | tuple[np.ndarray, np.ndarray]",
    validation: tuple[np.ndarray, np.ndarray] | None,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    patience: int,
    seed: int,
) -> dict[str, list[float]]:
    """Trains the classifier's head on cached backbone features; returns the per-epoch history.

    This is the same optimisation as `classifier.fit` on images: the backbone is frozen and in
    inference mode (BatchNorm uses its stored statistics), so it maps each image to the same
    features every epoch. Computing them once and fitting the shared Dropout + Dense layers on
    them gives the same gradients without running MobileNetV2 epochs × images times.

    The train split streams in shuffled batches (a FeatureStream reads one row group at a time),
    so memory does not grow with the dataset; the validation split is held in memory.
    """
    if isinstance(train, tuple):
        train = InMemoryFeatures(*train)
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    feature_dim = int(classifier.get_layer(HEAD_DENSE).input_shape[-1])
    head = head_model(classifier, feature_dim)
    head.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        # Many small steps per call: a linear head's step is cheaper than the call itself.
        steps_per_execution=STEPS_PER_EXECUTION,
    )
    epochs_started = itertools.count()

    def one_epoch():
        yield from train.shuffled_chunks(seed, next(epochs_started))

    chunks = tf.data.Dataset.from_generator(one_epoch, output_signature=(
        tf.TensorSpec([None, feature_dim], tf.float32), tf.TensorSpec([None], tf.int64)))
    steps = -(-train.num_rows // batch_size)
    batches = chunks.rebatch(batch_size).apply(tf.data.experimental.assert_cardinality(steps)).prefetch(2)
    callbacks, validation_data = [], None
    if validation is not None and len(validation[1]) > 0:
        validation_data = validation
        callbacks.append(keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience, restore_best_weights=True))
    history = head.fit(batches, validation_data=validation_data, epochs=epochs, callbacks=callbacks, verbose=0)
    return {name: [float(value) for value in values] for name, values in history.history.items()}


def predict_from_features(classifier: keras.Model, features: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Class probabilities from cached features: the classifier's output without rerunning the backbone."""
    return head_model(classifier, features.shape[1]).predict(features, batch_size=batch_size, verbose=0)
