"""The classifier: frozen backbone + a new Dropout → Dense head, built with the Functional API.

The end-to-end model takes raw RGB pixels (0–255, any size) and returns class probabilities.
Training never runs it, though: see `train_head`.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from headstart.data.preprocessing import resize_images
from headstart.features.streams import FeatureStream, InMemoryFeatures
from headstart.infra.keras import keras, tf

HEAD_DROPOUT = "head_dropout"
HEAD_DENSE = "head_dense"


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


def build_classifier(
    backbone_layer: keras.layers.Layer, num_classes: int, image_size: int, dropout: float, seed: int
) -> keras.Model:
    """Images → ImagePreprocessing → frozen backbone → Dropout → Dense(softmax)."""
    backbone_layer.trainable = False
    images = keras.Input((None, None, 3), name="images")
    pixels = ImagePreprocessing(image_size, name="preprocessing")(images)
    features = backbone_layer(pixels, training=False)
    dropout_layer, dense = _new_head_layers(num_classes, dropout, seed)
    return keras.Model(images, dense(dropout_layer(features)), name="headstart_classifier")


def _new_head_layers(num_classes: int, dropout: float, seed: int) -> tuple[keras.layers.Layer, keras.layers.Layer]:
    dropout_layer = keras.layers.Dropout(dropout, seed=seed, name=HEAD_DROPOUT)
    dense = keras.layers.Dense(
        num_classes,
        activation="softmax",
        name=HEAD_DENSE,
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed),
    )
    return dropout_layer, dense


def new_head(feature_dim: int, num_classes: int, dropout: float, seed: int) -> keras.Model:
    """The head `build_classifier` adds (Dropout → Dense softmax, initialised alike), alone on a
    features input: what a sweep trains for each setting it tries."""
    features = keras.Input((feature_dim,), name="features")
    dropout_layer, dense = _new_head_layers(num_classes, dropout, seed)
    return keras.Model(features, dense(dropout_layer(features)), name="head")


def head_model(classifier: keras.Model, feature_dim: int) -> keras.Model:
    """The classifier's own head layers (shared, not copied) on a features input."""
    features = keras.Input((feature_dim,), name="features")
    dropped = classifier.get_layer(HEAD_DROPOUT)(features)
    return keras.Model(features, classifier.get_layer(HEAD_DENSE)(dropped), name="head")


def rebuilt_head(kernel: np.ndarray, bias: np.ndarray) -> keras.Model:
    """The head `build_classifier` builds (Dropout → Dense softmax), on a features input, holding
    the given Dense weights: a saved run's head, with nothing taken from its model file but numbers."""
    features = keras.Input((kernel.shape[0],), name="features")
    dropped = keras.layers.Dropout(0.0, name=HEAD_DROPOUT)(features)
    dense = keras.layers.Dense(kernel.shape[1], activation="softmax", name=HEAD_DENSE)
    head = keras.Model(features, dense(dropped), name="head")
    dense.set_weights([kernel, bias])
    return head


def train_head(
    classifier: keras.Model,
    train: "FeatureStream | InMemoryFeatures | tuple[np.ndarray, np.ndarray]",
    validation: "FeatureStream | InMemoryFeatures | tuple[np.ndarray, np.ndarray] | None",
    epochs: int,
    batch_size: int,
    learning_rate: float,
    patience: int,
    seed: int,
    on_epoch: Callable[[int, dict[str, list[float]]], None] | None = None,
    class_weights: np.ndarray | None = None,
    weight_decay: float = 0.0,
) -> dict[str, list[float]]:
    """Trains the classifier's head on cached backbone features; returns the per-epoch history
    (given, after each epoch, to `on_epoch` with the epoch's index).

    This is the same optimisation as `classifier.fit` on images: the backbone is frozen and in
    inference mode (BatchNorm uses its stored statistics), so it maps each image to the same
    features every epoch. Computing them once and fitting the shared Dropout + Dense layers on
    them gives the same gradients without running MobileNetV2 epochs × images times.

    Both splits stream in chunks (a FeatureStream reads one row group at a time, the train split
    shuffled), so memory does not grow with the dataset. Each training chunk is one graph call
    that steps through its mini-batches: the head's step is so cheap that `fit`'s per-step and
    per-epoch machinery would cost more than the training, and `fit` on the same batches reached a
    different test accuracy (both in benchmarks/results/speed-tricks.md). Early stopping as in
    Keras: after `patience` epochs without a lower validation loss, keeping the weights of the
    best epoch. With `class_weights` (headstart.training.imbalance), each image's loss, in
    training and in the validation loss that stops it, is weighted by its class's weight. A
    `weight_decay` above 0 makes the optimiser AdamW (decoupled weight decay) instead of Adam.
    """
    train, validation = (
        InMemoryFeatures(*split) if isinstance(split, tuple) else split for split in (train, validation)
    )
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    feature_dim = int(classifier.get_layer(HEAD_DENSE).input_shape[-1])
    head = head_model(classifier, feature_dim)
    optimizer = (
        keras.optimizers.AdamW(learning_rate, weight_decay=weight_decay)
        if weight_decay
        else keras.optimizers.Adam(learning_rate)
    )
    optimizer.build(head.trainable_variables)
    unweighted = keras.losses.SparseCategoricalCrossentropy()
    weights = None if class_weights is None else tf.constant(np.asarray(class_weights, np.float32))

    def cross_entropy(labels, probabilities):
        if weights is None:
            return unweighted(labels, probabilities)
        return unweighted(labels, probabilities, sample_weight=tf.gather(weights, labels))

    rows_spec = (
        tf.TensorSpec([None, feature_dim], tf.float32),
        tf.TensorSpec([None], tf.int64),
        tf.TensorSpec([None], tf.int64),
    )

    # Written as graph code (tf.while_loop), so that AutoGraph has no Python loop to convert on every run.
    @tf.function(input_signature=rows_spec, autograph=False)
    def fit_rows(features, labels, order):
        """One optimiser step per mini-batch of `order`'s rows; returns (summed loss, correct predictions)."""
        count = tf.shape(order)[0]

        def step(start, loss_sum, correct):
            end = tf.minimum(start + batch_size, count)
            rows = order[start:end]
            batch_labels = tf.gather(labels, rows)
            with tf.GradientTape() as tape:
                probabilities = head(tf.gather(features, rows), training=True)
                loss = cross_entropy(batch_labels, probabilities)
            gradients = tape.gradient(loss, head.trainable_variables)
            optimizer.apply_gradients(zip(gradients, head.trainable_variables))
            # Summed in float64, so that the epoch's loss does not depend on how its rows were cut into calls.
            return (
                start + batch_size,
                loss_sum + tf.cast(loss, tf.float64) * tf.cast(end - start, tf.float64),
                correct + _correct(batch_labels, probabilities),
            )

        _, loss_sum, correct = tf.while_loop(
            lambda start, *_: start < count, step, (tf.constant(0), tf.constant(0.0, tf.float64), tf.constant(0.0))
        )
        return loss_sum, correct

    @tf.function(input_signature=rows_spec[:2], autograph=False)
    def score_chunk(features, labels):
        probabilities = head(features, training=False)
        return cross_entropy(labels, probabilities) * tf.cast(tf.shape(labels)[0], tf.float32), _correct(
            labels, probabilities
        )

    def score() -> tuple[float, float]:
        sums = np.array(
            [[float(value) for value in score_chunk(features, labels)] for features, labels in validation.chunks()]
        ).sum(0)
        return float(sums[0] / validation.num_rows), float(sums[1] / validation.num_rows)

    has_validation = validation is not None and validation.num_rows > 0
    history: dict[str, list[float]] = {"loss": [], "accuracy": []} | (
        {"val_loss": [], "val_accuracy": []} if has_validation else {}
    )
    best_loss, best_weights, epochs_without_improvement = np.inf, None, 0
    for epoch in range(epochs):
        loss_sum = correct = 0.0
        for features, labels in _whole_batches(train.shuffled_chunks(seed, epoch), batch_size):
            chunk_loss, chunk_correct = fit_rows(features, labels, np.arange(len(labels)))
            loss_sum, correct = loss_sum + float(chunk_loss), correct + float(chunk_correct)
        history["loss"].append(loss_sum / train.num_rows)
        history["accuracy"].append(correct / train.num_rows)
        if has_validation:
            validation_loss, validation_accuracy = score()
            history["val_loss"].append(validation_loss)
            history["val_accuracy"].append(validation_accuracy)
        if on_epoch is not None:
            on_epoch(epoch, history)
        if not has_validation:
            continue
        if validation_loss < best_loss:
            best_loss, best_weights, epochs_without_improvement = validation_loss, head.get_weights(), 0
        else:
            epochs_without_improvement += 1
            if epochs_without_improvement >= patience:
                break
    if best_weights is not None:
        head.set_weights(best_weights)
    return history


def _correct(labels, probabilities):
    return tf.reduce_sum(tf.cast(tf.equal(tf.argmax(probabilities, axis=-1), labels), tf.float32))


def _whole_batches(chunks, batch_size: int):
    """Re-cuts chunks so that each one holds whole mini-batches; the remainder joins the next chunk."""
    leftover = None
    for features, labels in chunks:
        if leftover is not None:
            features, labels = np.concatenate([leftover[0], features]), np.concatenate([leftover[1], labels])
        whole = len(labels) - len(labels) % batch_size
        if whole:
            yield features[:whole], labels[:whole]
        leftover = (features[whole:], labels[whole:])
    if leftover is not None and len(leftover[1]):
        yield leftover


def head_logits(classifier: keras.Model, features: np.ndarray) -> np.ndarray:
    """The head's logits (its Dense layer before the softmax) on features, in float64: what
    calibration fits, free of the softmax's rounding near 0 and 1."""
    kernel, bias = classifier.get_layer(HEAD_DENSE).get_weights()
    return np.asarray(features, np.float64) @ kernel.astype(np.float64) + bias.astype(np.float64)


def scale_head(classifier: keras.Model, temperature: float) -> None:
    """Divides the head's logits by `temperature` for good: softmax(z / T) is softmax of a Dense
    layer whose kernel and bias are divided by T, so the model and every file written from it
    give the calibrated probabilities with no layer added."""
    dense = classifier.get_layer(HEAD_DENSE)
    kernel, bias = dense.get_weights()
    dense.set_weights([kernel / np.float32(temperature), bias / np.float32(temperature)])


def predict_from_features(classifier: keras.Model, features: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Class probabilities from cached features: the classifier's output without rerunning the backbone.
    Called batch by batch rather than through `predict`, whose tf.data pipeline costs more than
    this small head and logs an error line about its own graph on every first call."""
    head = head_model(classifier, features.shape[1])
    batches = [
        head(features[start : start + batch_size], training=False).numpy()
        for start in range(0, len(features), batch_size)
    ]
    return np.concatenate(batches) if batches else np.zeros((0, head.output_shape[-1]), np.float32)
