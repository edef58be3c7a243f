"""Using a finished run on images: its probabilities through its classifier from raw pixels (or its
head on features it shares), and evaluation on a labelled folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from headstart.backbone.handles import Backbone
from headstart.data.folders import list_class_files
from headstart.data.manifest import DataReport
from headstart.data.preprocessing import apply_to_decoded, decoded_batches, image_batches
from headstart.errors import HeadstartError
from headstart.evaluation.calibration import expected_calibration_error
from headstart.evaluation.metrics import classification_metrics
from headstart.features.dataset import FeatureSet
from headstart.registry.runs import Run
from headstart.serving.predict import list_images


def predict_files(
    run: Run,
    paths: list[Path],
    batch_size: int = 64,
    expected_hashes: list[str] | None = None,
) -> tuple[np.ndarray, list[int], list[dict[str, str]]]:
    """Probabilities [n, classes] through the run's classifier, from raw pixels, for the image
    files that decode (the caller checks them first) and, given their content hashes, still hold
    that content; the positions in `paths` they belong to; and the other files, with their reasons."""
    backbone = run.backbone
    if backbone.litert_model is not None:
        # The head learnt int8 features: the classifier's float backbone would feed it others.
        from headstart.config import INT8_ENGINE
        from headstart.features.engines import choose_engine
        from headstart.training.head import predict_from_features

        head = run.head()
        engine = choose_engine(backbone, INT8_ENGINE, run.path, threads=None).engine
        probabilities, kept, unusable = apply_to_decoded(
            decoded_batches([str(p) for p in paths], run.image_size, batch_size, expected_hashes),
            lambda images: predict_from_features(head, engine(images)),
        )
    else:
        predict = run.classifier()
        probabilities, kept, unusable = apply_to_decoded(
            image_batches([str(p) for p in paths], run.image_size, batch_size, expected_hashes),
            lambda images: predict(images * 255.0),
        )
    if probabilities is None:
        probabilities = np.zeros((0, len(run.class_names)), np.float32)
    return probabilities, kept, [{"path": str(paths[index]), "reason": reason} for index, reason in unusable]


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
    label_of = {path: label for path, label, _ in files}
    probabilities, kept, unusable = predict_files(run, usable, batch_size)
    labels = np.array([label_of[usable[index]] for index in kept], np.int64)
    metrics = classification_metrics(labels, probabilities, class_names)
    metrics["expected_calibration_error"] = expected_calibration_error(probabilities, labels)
    metrics["skipped"] = report.skipped + skipped + unusable
    return metrics


def run_probabilities(
    run: Run,
    backbone: Backbone,
    features: FeatureSet,
    fair: np.ndarray,
    paths: list[str],
    hashes: list[str],
) -> tuple[np.ndarray, np.ndarray]:
    """A run's (the champion's, say) probabilities on the test images marked `fair` (of all the test
    split's `paths` and content `hashes`), and which images they are: its head on the candidate's
    cached features where it saw the same features, else its classifier on the raw images, less
    any whose file no longer holds the content the candidate was scored on."""
    if not fair.any():
        return np.zeros((0, len(run.class_names)), np.float32), fair
    same_features = (
        run.config.get("backbone_fingerprint") == backbone.fingerprint and run.image_size == backbone.image_size
    )
    if same_features:
        from headstart.training.head import predict_from_features

        return predict_from_features(run.head(), features.load("test")[0][fair]), fair
    positions = np.flatnonzero(fair)
    probabilities, kept, _ = predict_files(
        run, [Path(paths[i]) for i in positions], expected_hashes=[hashes[i] for i in positions]
    )
    scored = np.zeros_like(fair)
    scored[positions[kept]] = True
    return probabilities, scored
