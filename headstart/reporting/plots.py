"""The run's pictures, rendered to PNG bytes: curves, confusion matrix, predictions, mistakes."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from headstart.data.images import load_image  # noqa: E402
from headstart.evaluation.calibration import confidence_and_correct, coverage_curve  # noqa: E402

RIGHT, WRONG = "#1a7f37", "#cf222e"


def _to_png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def plot_training_curves(history: dict[str, list[float]], title: str = "Training: train vs validation") -> bytes:
    """Loss and accuracy per epoch; validation scores may start one epoch earlier, at epoch 0 (before training)."""
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, metric in zip(axes, ("loss", "accuracy")):
        epochs = len(history.get(metric, []))
        axis.plot(range(1, epochs + 1), history.get(metric, []), marker="o", label="train")
        if f"val_{metric}" in history:
            validation = history[f"val_{metric}"]
            axis.plot(range(epochs + 1 - len(validation), epochs + 1), validation, marker="o", label="validation")
        axis.set_xlabel("epoch")
        axis.set_title(metric)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(title)
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


# Pixels of one image in a prediction grid: about what its 2.2-inch cell shows at 100 dpi.
THUMBNAIL = 200
CAPTION = 44  # pixels above each image for its two-line caption
GAP = 12


def plot_prediction_grid(
    paths: list[str], labels: np.ndarray, probabilities: np.ndarray, class_names: list[str], title: str
) -> bytes:
    """Images with 'predicted (probability) / true' captions, green when right, red when wrong.

    One picture of all the thumbnails rather than an axes per image, which matplotlib would lay out
    and render one by one; and a large photo is decoded at reduced size and scaled once, by PIL,
    instead of by matplotlib at full size.
    """
    count = max(1, len(paths))
    columns = min(6, count)
    rows = (count + columns - 1) // columns
    cell_width, cell_height = THUMBNAIL + GAP, THUMBNAIL + CAPTION
    montage = np.full((rows * cell_height, columns * cell_width, 3), 255, np.uint8)
    figure = plt.figure(figsize=(2.2 * columns, 2.5 * rows))
    axis = figure.add_axes((0, 0, 1, 0.94 if rows == 1 else 0.97))
    axis.axis("off")
    for index, (path, label, probs) in enumerate(zip(paths, labels, probabilities)):
        top, left = (index // columns) * cell_height + CAPTION, (index % columns) * cell_width + GAP // 2
        thumbnail = _thumbnail(path)
        height, width = thumbnail.shape[:2]
        y, x = top + (THUMBNAIL - height) // 2, left + (THUMBNAIL - width) // 2
        montage[y : y + height, x : x + width] = thumbnail
        predicted = int(np.argmax(probs))
        axis.text(
            left + THUMBNAIL / 2,
            top - 4,
            f"{class_names[predicted]} ({probs[predicted]:.2f})\ntrue: {class_names[int(label)]}",
            ha="center",
            va="bottom",
            fontsize=9,
            color=RIGHT if predicted == int(label) else WRONG,
        )
    axis.imshow(montage, interpolation="nearest")
    if not paths:
        axis.text(montage.shape[1] / 2, montage.shape[0] / 2, "none", ha="center", va="center")
    figure.suptitle(title)
    return _to_png(figure)


def _thumbnail(path: str) -> np.ndarray:
    """The image scaled to fit THUMBNAIL × THUMBNAIL, upright (EXIF), RGB."""
    return np.asarray(thumbnail_image(path, THUMBNAIL))


def thumbnail_image(path: str, side: int) -> Image.Image:
    """The image scaled to fit side × side, upright (EXIF), RGB; a side of at least one pixel
    however long and thin the image."""
    image = Image.fromarray(load_image(path, draft_size=side))
    # Small images are enlarged pixel by pixel, as matplotlib shows them: smoothing them would
    # invent detail, and made the PNG six times larger.
    enlarging = max(image.size) < side
    resampling = Image.Resampling.NEAREST if enlarging else Image.Resampling.LANCZOS
    width, height = image.size
    if min(width, height) * side < max(width, height):  # contain would round its short side to 0
        scale = side / max(width, height)
        return image.resize((max(1, round(width * scale)), max(1, round(height * scale))), resampling)
    return ImageOps.contain(image, (side, side), resampling)


def sample_indices(count: int, sample_size: int, seed: int) -> np.ndarray:
    generator = np.random.default_rng(seed)
    return np.sort(generator.choice(count, size=min(sample_size, count), replace=False))


def confident_mistake_indices(labels: np.ndarray, probabilities: np.ndarray, limit: int) -> np.ndarray:
    """Wrong predictions, most confident first."""
    predictions = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predictions != labels)
    confidence = probabilities[wrong, predictions[wrong]]
    return wrong[np.argsort(-confidence, kind="stable")][:limit]


def plot_near_duplicates(pairs: list[dict], limit: int = 4) -> bytes:
    """The most similar test / training pairs (as the data report lists them), two to a row, each
    test image beside its nearest training image, with their similarity and both classes."""
    shown = pairs[:limit]
    columns = min(2, len(shown))
    rows = -(-len(shown) // columns)
    figure = plt.figure(figsize=(4.8 * columns, 2.9 * rows + 0.4))
    for index, pair in enumerate(shown):
        row, column = divmod(index, columns)
        # Each pair in its own cell below the figure's title, its caption in the cell's top fifth
        # and a blank margin either side, so that pairs stay apart.
        cell_height = 0.93 / rows
        axis = figure.add_axes(
            (column / columns + 0.05 / columns, 0.93 - (row + 1) * cell_height, 0.9 / columns, 0.8 * cell_height)
        )
        axis.axis("off")
        images = [_thumbnail(pair["path"]), _thumbnail(pair["train_path"])]
        side_by_side = np.full((max(image.shape[0] for image in images), THUMBNAIL * 2 + GAP, 3), 255, np.uint8)
        for position, image in enumerate(images):
            left = position * (THUMBNAIL + GAP) + (THUMBNAIL - image.shape[1]) // 2
            side_by_side[: image.shape[0], left : left + image.shape[1]] = image
        axis.imshow(side_by_side, interpolation="nearest")
        axis.set_title(
            f"cosine {pair['similarity']:.3f}\ntest: {pair['label']}  |  train: {pair['train_label']}",
            fontsize=10,
            color=RIGHT if pair["label"] == pair["train_label"] else WRONG,
        )
    figure.suptitle("Near-duplicates: test image (left), its nearest training image (right)")
    return _to_png(figure)


def plot_reliability(calibration: dict) -> bytes:
    """The reliability diagram of the test split before and after temperature scaling: each
    confidence bin's accuracy against its mean confidence (the diagonal is a calibrated model)."""
    figure, axis = plt.subplots(figsize=(5, 5))
    axis.plot([0, 1], [0, 1], color="grey", linestyle="--", label="calibrated")
    for key, name, style in (("reliability_before", "before", "o-"), ("reliability_after", "after", "s-")):
        rows = calibration[key]
        ece = calibration[f"ece_{name}"]
        label = f"{name} (T = {calibration['temperature']:.2f})" if name == "after" else name
        axis.plot(
            [row["confidence"] for row in rows],
            [row["accuracy"] for row in rows],
            style,
            label=f"{label}, ECE {ece:.3f}",
        )
    axis.set_xlabel("confidence (top probability)")
    axis.set_ylabel("accuracy")
    axis.set_xlim(0, 1.02)
    axis.set_ylim(0, 1.02)
    axis.grid(alpha=0.3)
    axis.legend(loc="upper left")
    axis.set_title("Reliability (test split)")
    return _to_png(figure)


def plot_coverage(confidence: np.ndarray, correct: np.ndarray, unsure: dict) -> bytes:
    """Accuracy of the images kept against the share kept, as the confidence threshold slides
    (test split), with the thresholds chosen on validation for the reported target accuracies."""
    curve = coverage_curve(confidence, correct)
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot([point["coverage"] for point in curve], [point["accuracy"] for point in curve], "-")
    for row in unsure["rows"]:
        if row["threshold"] is not None:
            axis.plot(row["test_coverage"], row["test_accuracy"], "o", color=WRONG)
            axis.annotate(
                f"{row['target_accuracy']:g}",
                (row["test_coverage"], row["test_accuracy"]),
                textcoords="offset points",
                xytext=(4, -12),
            )
    axis.set_xlabel("coverage (share of images labelled)")
    axis.set_ylabel("accuracy of the labelled images")
    axis.set_xlim(0, 1.02)
    axis.grid(alpha=0.3)
    axis.set_title(
        "Unsure below a threshold: coverage and accuracy (test split;\ndots: thresholds chosen on validation)"
    )
    return _to_png(figure)


# The plots of a run, by file name, in the order the report shows them; NEAR_DUPLICATES_PLOT only
# where the test split has near-duplicates of training images, FINE_TUNING_PLOT where it ran.
PLOT_FILES = (
    "training_curves.png",
    "confusion_matrix.png",
    "reliability.png",
    "coverage.png",
    "sample_predictions.png",
    "confident_mistakes.png",
)
NEAR_DUPLICATES_PLOT = "near_duplicates.png"
FINE_TUNING_PLOT = "fine_tuning_curves.png"


def plot_run(
    history: dict,
    metrics: dict,
    labels: np.ndarray,
    paths: list[str],
    probabilities: np.ndarray,
    seed: int,
    near_duplicates: list[dict] = (),
    fine_tuning: dict | None = None,
) -> dict[str, bytes]:
    """A run's plots as PNG bytes by file name (PLOT_FILES): its training curves, and its test
    split's confusion matrix, a seeded sample of predictions and the most confident mistakes;
    the fine-tuning curves where `fine_tuning` (its history) is given; and the closest test /
    training pairs where `near_duplicates` (most similar first) has any."""
    samples = sample_indices(len(paths), 12, seed)
    mistakes = confident_mistake_indices(labels, probabilities, 12)
    names = metrics["class_names"]
    figures = {
        "training_curves.png": plot_training_curves(history),
        "confusion_matrix.png": plot_confusion_matrix(metrics["confusion_matrix"], names),
        "sample_predictions.png": plot_prediction_grid(
            [paths[i] for i in samples], labels[samples], probabilities[samples], names, "Sample test predictions"
        ),
        "confident_mistakes.png": plot_prediction_grid(
            [paths[i] for i in mistakes], labels[mistakes], probabilities[mistakes], names, "Most confident mistakes"
        ),
    }
    if "calibration" in metrics:  # metrics of the evaluate step with the calibration step's record
        figures["reliability.png"] = plot_reliability(metrics["calibration"])
        figures["coverage.png"] = plot_coverage(*confidence_and_correct(probabilities, labels), metrics["unsure"])
    ordered = {name: figures[name] for name in PLOT_FILES if name in figures}
    if fine_tuning is not None:
        ordered = {
            "training_curves.png": ordered.pop("training_curves.png"),
            FINE_TUNING_PLOT: plot_training_curves(
                fine_tuning, "Fine-tuning: train vs validation (epoch 0: the head alone)"
            ),
            **ordered,
        }
    if near_duplicates:
        ordered[NEAR_DUPLICATES_PLOT] = plot_near_duplicates(list(near_duplicates))
    return ordered
