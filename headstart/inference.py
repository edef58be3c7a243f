"""Using a finished run through its serving model, from raw pixels: evaluate on a labelled folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from headstart.data.folders import list_class_files
from headstart.data.manifest import DataReport
from headstart.errors import HeadstartError
from headstart.evaluation import classification_metrics
from headstart.prediction import list_images
from headstart.preprocessing import image_batches
from headstart.runs import Run


def predict_files(run: Run, paths: list[Path], batch_size: int = 64) -> np.ndarray:
    """Probabilities [n, classes] for image files that decode (the caller checks them first),
    through the run's serving model, from raw pixels."""
    predict = run.serving_model()
    outputs = [predict(batch * 255.0) for batch in image_batches([str(p) for p in paths], run.image_size, batch_size)]
    return np.concatenate(outputs) if outputs else np.zeros((0, len(run.class_names)), np.float32)


def evaluate_folder(run: Run, folder: Path, batch_size: int = 64) -> dict:
    """Metrics of a run on a folder whose sub-folders are named like (some of) the run's classes."""
    folder = Path(folder)
    class_names = run.class_names
    if not folder.is_dir():
        raise HeadstartError(f"data folder not found: {folder}")
    if not any((folder / name).is_dir() for name in class_names):
        raise HeadstartError(f"{folder} has none of the model's class folders ({', '.join(class_names)})")
    report = DataReport(source=str(folder), class_names=class_names)
    files = list_class_files(folder, class_names, report)
    usable, skipped = list_images([path for path, _, _ in files])
    if not usable:
        raise HeadstartError(f"no readable images in {folder}")
    usable_set = set(usable)
    labels = np.array([label for path, label, _ in files if path in usable_set], np.int64)
    metrics = classification_metrics(labels, predict_files(run, usable, batch_size), class_names)
    metrics["skipped"] = report.skipped + skipped
    return metrics
