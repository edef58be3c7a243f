"""Fitting the head as its configuration says: by Adam (headstart.training.head.train_head) or by
L-BFGS (headstart.training.logistic), its classes weighed as asked (headstart.training.imbalance)."""

from __future__ import annotations

from typing import Callable

import numpy as np

from headstart.config import HeadConfig
from headstart.features.dataset import FeatureSet
from headstart.features.streams import SelectedRows
from headstart.training.imbalance import class_weights
from headstart.training.logistic import fit_logistic_regression


def fit_configured_head(
    settings: HeadConfig,
    classifier,
    features: FeatureSet,
    on_epoch: Callable[[int, dict[str, list[float]]], None] | None = None,
    leave_out: frozenset[str] = frozenset(),
) -> dict[str, list[float]]:
    """Fits the classifier's head on a features file's train split as `settings` say: by Adam
    (`train_head`) or L-BFGS (headstart.training.logistic), its classes weighed as
    `settings.class_weights` says (the weights then in the history, as `class_weights`); without
    the images whose content hashes are in `leave_out` (headstart.evaluation.label_issues)."""
    from headstart.training.head import HEAD_DENSE, train_head

    num_classes = int(classifier.get_layer(HEAD_DENSE).get_weights()[1].shape[0])
    train, validation = features.stream("train"), features.stream("validation")
    labels = features.labels_and_paths("train")[0]
    if leave_out:
        train = SelectedRows(train, leave_out)
        rows = features.rows("train", ["sha256", "label"])
        labels = np.array([label for sha, label in zip(rows["sha256"], rows["label"]) if sha not in leave_out])
    weights = class_weights(settings.class_weights, labels, num_classes)
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
