"""The run's pictures, rendered to PNG bytes: curves, confusion matrix, predictions, mistakes."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from headstart.data import load_image  # noqa: E402

RIGHT, WRONG = "#1a7f37", "#cf222e"


def _to_png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def plot_training_curves(history: dict[str, list[float]]) -> bytes:
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, metric in zip(axes, ("loss", "accuracy")):
        epochs = range(1, len(history.get(metric, [])) + 1)
        axis.plot(epochs, history.get(metric, []), marker="o", label="train")
        if f"val_{metric}" in history:
            axis.plot(epochs, history[f"val_{metric}"], marker="o", label="validation")
        axis.set_xlabel("epoch")
        axis.set_title(metric)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle("Training: train vs validation")
    return _to_png(figure)


def plot_confusion_matrix(matrix: list[list[int]], class_names: list[str]) -> bytes:
    matrix = np.asarray(matrix)
    size = max(4, 0.6 * len(class_names) + 2)
    figure, axis = plt.subplots(figsize=(size, size))
    image = axis.imshow(matrix, cmap="Blues")
    axis.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    axis.set_yticks(range(len(class_names)), class_names)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    threshold = matrix.max() / 2 if matrix.size else 0
    for (row, column), value in np.ndenumerate(matrix):
        axis.text(column, row, str(value), ha="center", va="center", color="white" if value > threshold else "black")
    figure.colorbar(image, ax=axis, fraction=0.046)
    axis.set_title("Confusion matrix (test split)")
    return _to_png(figure)


def plot_prediction_grid(paths: list[str], labels: np.ndarray, probabilities: np.ndarray, class_names: list[str], title: str) -> bytes:
    """Images with 'predicted (probability) / true' captions, green when right, red when wrong."""
    count = max(1, len(paths))
    columns = min(6, count)
    rows = (count + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.5 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, path, label, probs in zip(axes.flat, paths, labels, probabilities):
        predicted = int(np.argmax(probs))
        axis.imshow(load_image(path))
        axis.set_title(
            f"{class_names[predicted]} ({probs[predicted]:.2f})\ntrue: {class_names[int(label)]}",
            color=RIGHT if predicted == int(label) else WRONG, fontsize=9,
        )
    if not paths:
        axes.flat[0].text(0.5, 0.5, "none", ha="center", va="center")
    figure.suptitle(title)
    return _to_png(figure)


def sample_indices(count: int, sample_size: int, seed: int) -> np.ndarray:
    generator = np.random.default_rng(seed)
    return np.sort(generator.choice(count, size=min(sample_size, count), replace=False))


def confident_mistake_indices(labels: np.ndarray, probabilities: np.ndarray, limit: int) -> np.ndarray:
    """Wrong predictions, most confident first."""
    predictions = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predictions != labels)
    confidence = probabilities[wrong, predictions[wrong]]
    return wrong[np.argsort(-confidence, kind="stable")][:limit]
