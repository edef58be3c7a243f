"""Classification metrics: accuracy, per-class precision / recall / F1, confusion matrix; and
scoring a trained classifier on one split of its dataset's cached features."""

from __future__ import annotations

import numpy as np

from headstart.evaluation.calibration import (
    CALIBRATION_BINS,
    confidence_and_correct,
    coverage_and_accuracy,
    coverage_rows,
    expected_calibration_error,
    fit_temperature,
    reliability,
    softmax,
    threshold_for_accuracy,
)
from headstart.features.dataset import FeatureSet
from headstart.training.imbalance import balanced_accuracy


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(labels, np.int64), np.asarray(predictions, np.int64)), 1)
    return matrix


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray, class_names: list[str]) -> dict:
    labels = np.asarray(labels, np.int64)
    predictions = np.asarray(probabilities).argmax(axis=1)
    matrix = confusion_matrix(labels, predictions, len(class_names))
    per_class = {}
    for index, name in enumerate(class_names):
        true_positive = int(matrix[index, index])
        predicted = int(matrix[:, index].sum())
        actual = int(matrix[index, :].sum())
        precision = true_positive / predicted if predicted else 0.0
        recall = true_positive / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
    count = int(len(labels))
    return {
        "accuracy": float((predictions == labels).mean()) if count else 0.0,
        "n": count,
        "balanced_accuracy": balanced_accuracy(labels, predictions, len(class_names)),
        "macro_f1": float(np.mean([values["f1"] for values in per_class.values()])),
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
        "class_names": list(class_names),
    }


def evaluate_split(classifier, features: FeatureSet, split: str, class_names: list[str]) -> tuple[dict, np.ndarray]:
    """Metrics of the classifier on one split, and its probabilities there (in the file's row order),
    from the cached features: the backbone does not run again."""
    from headstart.training.head import predict_from_features

    probabilities, labels = [], []
    for chunk_features, chunk_labels in features.stream(split).chunks():  # one row group at a time
        probabilities.append(predict_from_features(classifier, chunk_features))
        labels.append(chunk_labels)
    probabilities, labels = np.concatenate(probabilities), np.concatenate(labels)
    return classification_metrics(labels, probabilities, list(class_names)), probabilities


def split_logits(classifier, features: FeatureSet, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The head's logits on one split's cached features and the split's labels, in the file's row order."""
    from headstart.training.head import head_logits

    chunks = list(features.stream(split).chunks())
    if not chunks:
        return np.zeros((0, 0)), np.zeros(0, np.int64)
    return (
        np.concatenate([head_logits(classifier, chunk_features) for chunk_features, _ in chunks]),
        np.concatenate([labels for _, labels in chunks]).astype(np.int64),
    )


def calibrate_classifier(classifier, features: FeatureSet) -> dict:
    """Fits the temperature on the validation split and folds it into the classifier's head
    (headstart.evaluation.calibration); returns the temperature and the validation split's
    expected calibration error before and after."""
    from headstart.training.head import scale_head

    logits, labels = split_logits(classifier, features, "validation")
    if len(labels) == 0:
        return {"temperature": 1.0, "validation_images": 0}
    temperature = fit_temperature(logits, labels)
    scale_head(classifier, temperature)
    return {
        "temperature": temperature,
        "validation_images": int(len(labels)),
        "validation_ece_before": expected_calibration_error(softmax(logits), labels),
        "validation_ece_after": expected_calibration_error(softmax(logits / temperature), labels),
    }


def split_confidences(classifier, features: FeatureSet) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """For the validation and test splits: each image's top probability and whether its label is right."""
    confidences = {}
    for split in ("validation", "test"):
        logits, labels = split_logits(classifier, features, split)
        confidences[split] = confidence_and_correct(softmax(logits), labels)
    return confidences


def trust_metrics(classifier, features: FeatureSet, calibration: dict, target_accuracy: float | None) -> dict:
    """What metrics.json says of the probabilities of the (calibrated) classifier: the test
    split's calibration error before and after temperature scaling with the reliability diagram's
    bins, and the "unsure" threshold: the one chosen on validation for `target_accuracy` where
    asked, and the test coverage and accuracy of those chosen for the reported targets."""
    logits, labels = split_logits(classifier, features, "validation")
    confidences = {"validation": confidence_and_correct(softmax(logits), labels)}
    logits, labels = split_logits(classifier, features, "test")
    before, after = softmax(logits * calibration["temperature"]), softmax(logits)
    confidences["test"] = confidence_and_correct(after, labels)
    unsure = {"target_accuracy": target_accuracy, "rows": coverage_rows(confidences["validation"], confidences["test"])}
    if target_accuracy is not None:
        unsure |= unsure_threshold(*confidences["validation"], target_accuracy)
    calibration = {
        **calibration,
        "bins": CALIBRATION_BINS,
        "ece_before": expected_calibration_error(before, labels),
        "ece_after": expected_calibration_error(after, labels),
        "reliability_before": reliability(before, labels),
        "reliability_after": reliability(after, labels),
    }
    return {"calibration": calibration, "unsure": unsure}


def unsure_threshold(confidence: np.ndarray, correct: np.ndarray, target_accuracy: float) -> dict:
    """The threshold chosen on validation for a target accuracy, with the coverage and accuracy it gives there."""
    threshold = threshold_for_accuracy(confidence, correct, target_accuracy)
    if threshold is None:
        return {"threshold": None}
    coverage, accuracy = coverage_and_accuracy(confidence, correct, threshold)
    return {"threshold": threshold, "validation_coverage": coverage, "validation_accuracy": accuracy}


def format_metrics(metrics: dict) -> str:
    """A plain-text report for the terminal."""
    balanced = f", balanced accuracy {metrics['balanced_accuracy']:.4f}" if "balanced_accuracy" in metrics else ""
    if "expected_calibration_error" in metrics:
        balanced += f", expected calibration error {metrics['expected_calibration_error']:.4f}"
    lines = [
        f"accuracy {metrics['accuracy']:.4f} on {metrics['n']} images (macro F1 {metrics['macro_f1']:.4f}{balanced})",
        "",
    ]
    width = max(len("class"), *(len(name) for name in metrics["class_names"])) + 2
    lines.append(f"{'class':<{width}}precision  recall  f1      support")
    for name, values in metrics["per_class"].items():
        lines.append(
            f"{name:<{width}}{values['precision']:<11.4f}{values['recall']:<8.4f}{values['f1']:<8.4f}{values['support']}"
        )
    lines += ["", "confusion matrix (rows: true, columns: predicted)"]
    lines.append(" " * width + "".join(f"{name[:8]:>9}" for name in metrics["class_names"]))
    for name, row in zip(metrics["class_names"], metrics["confusion_matrix"]):
        lines.append(f"{name:<{width}}" + "".join(f"{value:>9}" for value in row))
    return "\n".join(lines)
