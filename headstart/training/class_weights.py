"""Class weights for imbalanced data: each class's images weigh total / (classes × its count) in
the loss, so that every class counts as much as if the classes were balanced (scikit-learn's
"balanced" weights, Keras' `class_weight`)."""

from __future__ import annotations

import numpy as np

from headstart.config import IMBALANCE_RATIO


def imbalance_ratio(counts: np.ndarray) -> float:
    """The largest class's count over the smallest present one's (1.0: balanced)."""
    present = np.asarray(counts)[np.asarray(counts) > 0]
    return float(present.max() / present.min()) if len(present) else 1.0


def is_imbalanced(labels: np.ndarray, num_classes: int) -> bool:
    return imbalance_ratio(np.bincount(np.asarray(labels, np.int64), minlength=num_classes)) >= IMBALANCE_RATIO


def class_weights(setting: str, train_labels: np.ndarray, num_classes: int) -> np.ndarray | None:
    """The weight of each class's images in the head's loss, or None where they all weigh the same:
    setting 'balanced' always weighs them, 'auto' where the train split is imbalanced, 'none' never.
    A class with no training image gets weight 0 (it has nothing to weigh)."""
    counts = np.bincount(np.asarray(train_labels, np.int64), minlength=num_classes).astype(np.float64)
    if setting == "none" or (setting == "auto" and imbalance_ratio(counts) < IMBALANCE_RATIO):
        return None
    present = counts > 0
    weights = np.zeros(num_classes, np.float64)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights.astype(np.float32)
