"""Classification metrics: accuracy, per-class precision / recall / F1, confusion matrix; and
scoring a trained classifier on one split of its dataset's cached features."""

from __future__ import annotations

import numpy as np

from headstart.features.dataset import FeatureSet


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


def format_metrics(metrics: dict) -> str:
    """A plain-text report for the terminal."""
    lines = [f"accuracy {metrics['accuracy']:.4f} on {metrics['n']} images (macro F1 {metrics['macro_f1']:.4f})", ""]
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
