"""Imbalanced classes: when they count as imbalanced, class weights for the head's loss (each
class's images weigh total / (classes × its count), so that every class counts as much as if the
classes were balanced: scikit-learn's "balanced" weights, Keras' `class_weight`), and balanced
accuracy, what the gate and the sweep judge imbalanced classes by."""

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


def balanced_accuracy(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> float:
    """The mean of the per-class recalls over the classes present: what always predicting the most
    common class scores 1 / classes on, however imbalanced the split."""
    labels = np.asarray(labels, np.int64)
    return mean_recall(labels, labels == np.asarray(predictions, np.int64))


def mean_recall(labels: np.ndarray, correct: np.ndarray) -> float:
    """Balanced accuracy from whether each image was right: the mean over the classes present of
    the share of their images that were."""
    labels, correct = np.asarray(labels, np.int64), np.asarray(correct, bool)
    if not len(labels):
        return 0.0
    support = np.bincount(labels)
    present = support > 0
    return float((np.bincount(labels, correct, len(support))[present] / support[present]).mean())
