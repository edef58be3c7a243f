"""Fitting the head as its configuration says: by Adam (headstart.training.head.train_head) or by
L-BFGS (headstart.training.logistic), its classes weighed as asked (headstart.training.imbalance)."""

from __future__ import annotations

from typing import Callable

from headstart.config import HeadConfig
from headstart.features.dataset import FeatureSet
from headstart.training.imbalance import class_weights
from headstart.training.logistic import fit_logistic_regression


def fit_configured_head(
    settings: HeadConfig,
    classifier,
    features: FeatureSet,
    on_epoch: Callable[[int, dict[str, list[float]]], None] | None = None,
) -> dict[str, list[float]]:
    """Fits the classifier's head on a features file's train split as `settings` say: by Adam
    (`train_head`) or L-BFGS (headstart.training.logistic), its classes weighed as
    `settings.class_weights` says (the weights then in the history, as `class_weights`)."""
    from headstart.training.head import HEAD_DENSE, train_head

    num_classes = int(classifier.get_layer(HEAD_DENSE).get_weights()[1].shape[0])
    weights = class_weights(settings.class_weights, features.labels_and_paths("train")[0], num_classes)
    train, validation = features.stream("train"), features.stream("validation")
    if settings.solver == "lbfgs":
        history = fit_logistic_regression(classifier, train, validation, weights)
    else:
        history = train_head(
            classifier,
            train,
            validation,
            epochs=settings.epochs,
            batch_size=settings.batch_size,
            learning_rate=settings.learning_rate,
            patience=settings.patience,
            seed=settings.seed,
            on_epoch=on_epoch,
            class_weights=weights,
            weight_decay=settings.weight_decay,
        )
    if weights is not None:
        history["class_weights"] = [float(weight) for weight in weights]
    return history
