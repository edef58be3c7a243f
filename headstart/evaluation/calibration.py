"""How far a model's probabilities can be trusted: temperature scaling, the expected calibration
error and its reliability diagram, and the confidence below which an answer is "unsure".

Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", 2017) divides the
logits by one number T fitted on the validation split to minimise its negative log-likelihood.
The class ranking, hence every label and the accuracy, is unchanged; a head that says 0.99 where it
is right 9 times in 10 (T > 1) learns to say 0.9. For a Dense softmax head, dividing its kernel and
bias by T is the same operation (headstart.training.head.scale_head), so every file written from
the model afterwards (Keras, SavedModel, .tflite) gives the calibrated probabilities.
"""

from __future__ import annotations

import numpy as np

# Equal-width confidence bins of the expected calibration error and its diagram, as in Guo et al.
CALIBRATION_BINS = 15
# The targets the report's coverage table shows, each threshold chosen on validation, read on test.
REPORTED_TARGETS = (0.9, 0.95, 0.97, 0.99)
# Temperatures searched (log-spaced), wide enough for heads that are far over- or under-confident.
_LOWEST_TEMPERATURE, _HIGHEST_TEMPERATURE = 0.05, 50.0


def softmax(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, np.float64)
    if logits.size == 0:
        return logits
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray) -> float:
    logits = np.asarray(logits, np.float64)
    top = logits.max(axis=1, keepdims=True)
    log_normaliser = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
    return float(np.mean(log_normaliser - logits[np.arange(len(labels)), np.asarray(labels, np.int64)]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T minimising the negative log-likelihood of softmax(logits / T). The likelihood is
    convex in 1/T, so a golden-section search over log T finds its one minimum."""
    labels = np.asarray(labels, np.int64)
    if len(labels) == 0:
        return 1.0

    def loss(log_temperature: float) -> float:
        return negative_log_likelihood(np.asarray(logits, np.float64) / np.exp(log_temperature), labels)

    low, high = np.log(_LOWEST_TEMPERATURE), np.log(_HIGHEST_TEMPERATURE)
    ratio = (np.sqrt(5) - 1) / 2
    left, right = high - ratio * (high - low), low + ratio * (high - low)
    loss_left, loss_right = loss(left), loss(right)
    while high - low > 1e-5:
        if loss_left < loss_right:
            high, right, loss_right = right, left, loss_left
            left = high - ratio * (high - low)
            loss_left = loss(left)
        else:
            low, left, loss_left = left, right, loss_right
            right = low + ratio * (high - low)
            loss_right = loss(right)
    return float(np.exp((low + high) / 2))


def reliability(probabilities: np.ndarray, labels: np.ndarray, bins: int = CALIBRATION_BINS) -> list[dict]:
    """The reliability diagram's bins (equal width over the top class's probability): for each
    bin holding images, its range, mean confidence, accuracy and image count."""
    confidence, correct = confidence_and_correct(probabilities, labels)
    # A confidence of exactly 1.0 belongs to the last bin.
    index = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    rows = []
    for b in range(bins):
        members = index == b
        if members.any():
            rows.append(
                {
                    "low": b / bins,
                    "high": (b + 1) / bins,
                    "confidence": float(confidence[members].mean()),
                    "accuracy": float(correct[members].mean()),
                    "count": int(members.sum()),
                }
            )
    return rows


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = CALIBRATION_BINS) -> float:
    """The mean gap between confidence and accuracy over the bins, weighted by their image counts."""
    rows = reliability(probabilities, labels, bins)
    total = sum(row["count"] for row in rows)
    return float(sum(row["count"] * abs(row["confidence"] - row["accuracy"]) for row in rows) / total) if total else 0.0


def confidence_and_correct(probabilities: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probabilities = np.asarray(probabilities, np.float64)
    if len(probabilities) == 0:
        return np.zeros(0), np.zeros(0, bool)
    return probabilities.max(axis=1), probabilities.argmax(axis=1) == np.asarray(labels, np.int64)


def threshold_for_accuracy(confidence: np.ndarray, correct: np.ndarray, target: float) -> float | None:
    """The lowest confidence threshold at which the images at or above it are right at least
    `target` of the time (the answer keeping the most images); None where no threshold gets there.
    Images of equal confidence are kept or left out together, as a threshold would."""
    confidence, correct = np.asarray(confidence, np.float64), np.asarray(correct, bool)
    order = np.argsort(-confidence, kind="stable")
    confidence, correct = confidence[order], correct[order]
    kept = np.arange(1, len(confidence) + 1)
    accuracy = np.cumsum(correct) / np.maximum(kept, 1)
    # Only the last of a run of equal confidences is a threshold a user could set.
    cut = np.append(confidence[1:] != confidence[:-1], True) if len(confidence) else np.zeros(0, bool)
    reaching = np.flatnonzero(cut & (accuracy >= target))
    return float(confidence[reaching[-1]]) if len(reaching) else None


def coverage_and_accuracy(confidence: np.ndarray, correct: np.ndarray, threshold: float) -> tuple[float, float]:
    """The share of images at or above the threshold, and the accuracy among them."""
    confidence, correct = np.asarray(confidence), np.asarray(correct, bool)
    kept = confidence >= threshold
    coverage = float(kept.mean()) if len(kept) else 0.0
    return coverage, float(correct[kept].mean()) if kept.any() else 1.0


def coverage_curve(confidence: np.ndarray, correct: np.ndarray, points: int = 101) -> list[dict]:
    """Coverage and accuracy as the threshold slides over the confidences seen (a confidence slider)."""
    if len(confidence) == 0:
        return []
    thresholds = np.unique(np.quantile(np.asarray(confidence, np.float64), np.linspace(0, 1, points)))
    return [
        dict(zip(("threshold", "coverage", "accuracy"), (float(t), *coverage_and_accuracy(confidence, correct, t))))
        for t in thresholds
    ]


def coverage_rows(
    validation: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], targets=REPORTED_TARGETS
) -> list[dict]:
    """For each target accuracy: the threshold chosen on validation and what it gives on test."""
    rows = []
    for target in targets:
        threshold = threshold_for_accuracy(*validation, target)
        row = {"target_accuracy": target, "threshold": threshold}
        if threshold is not None:
            coverage, accuracy = coverage_and_accuracy(*test, threshold)
            row |= {"test_coverage": coverage, "test_accuracy": accuracy}
        rows.append(row)
    return rows
