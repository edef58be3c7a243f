"""Batch prediction with a trained run: image files and folders → label, probability, top classes.

Images take the path training's features took: decoded and shrunk as in extraction, the fast
engine (LiteRT where it passes its parity check) on the run's own backbone, then the run's head.
A file that cannot be used is listed with its reason, never fatal.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from headstart.config import Place, PredictConfig, is_url
from headstart.data.folders import image_files
from headstart.data.images import check_image
from headstart.data.preprocessing import apply_to_decoded, decoded_batches
from headstart.errors import HeadstartError
from headstart.evaluation.calibration import threshold_for_accuracy
from headstart.features.extraction import ExtractionContext, ExtractionSettings
from headstart.infra.object_store import ObjectStore, local_copy
from headstart.infra.storage import atomic_path
from headstart.registry.runs import Run

# Classes listed per image, most probable first, where a model has more than two.
TOP_K = 3
OUTPUT_SUFFIXES = (".csv", ".parquet")
# Under the artifacts root: the labels of predict runs given no output (default_output).
PREDICTIONS_FOLDER = "predictions"
# The label of an image whose most probable class is below the confidence threshold.
UNSURE = "unsure"


@dataclass
class Predictions:
    class_names: list[str]
    paths: list[str] = field(default_factory=list)
    probabilities: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    skipped: list[dict[str, str]] = field(default_factory=list)
    # Images whose top probability is below it are labelled UNSURE; None: every image gets its class.
    threshold: float | None = None

    def unsure(self) -> np.ndarray:
        if self.threshold is None or not len(self.paths):
            return np.zeros(len(self.paths), bool)
        return self.probabilities.max(axis=1) < self.threshold

    def rows(self) -> list[dict]:
        """path, label (UNSURE below the threshold), the most probable class's probability, whether
        it is unsure and that class (its best guess); and the top classes with theirs where there
        are more than two."""
        rows = []
        for path, probabilities, unsure in zip(self.paths, self.probabilities, self.unsure()):
            order = np.argsort(-probabilities, kind="stable")
            guess = self.class_names[order[0]]
            row = {
                "path": path,
                "label": UNSURE if unsure else guess,
                "probability": float(probabilities[order[0]]),
                "unsure": bool(unsure),
                "guess": guess,
            }
            if len(self.class_names) > 2:
                for rank, index in enumerate(order[:TOP_K], start=1):
                    row[f"top{rank}_label"], row[f"top{rank}_probability"] = (
                        self.class_names[index],
                        float(probabilities[index]),
                    )
            rows.append(row)
        return rows

    def counts(self) -> dict[str, int]:
        """Images per label, every class listed, and the unsure ones where there is a threshold."""
        predicted = Counter(row["label"] for row in self.rows())
        return {name: predicted.get(name, 0) for name in self.class_names} | (
            {UNSURE: predicted.get(UNSURE, 0)} if self.threshold is not None else {}
        )


def list_images(inputs: list[Path]) -> tuple[list[Path], list[dict[str, str]]]:
    """Image files as given, folders walked (hidden entries left out), in order; what is missing,
    not an image or undecodable is returned apart with its reason."""
    usable, skipped = [], []
    for given in map(Path, inputs):
        if given.is_dir():
            candidates, others = image_files(given)
            skipped.extend(others)
        else:
            candidates = [given]
        for path in candidates:
            reason = "file not found" if not path.is_file() else check_image(path)
            if reason:
                skipped.append({"path": str(path), "reason": reason})
            else:
                usable.append(path)
    return usable, skipped


def predict_images(run: Run, inputs: list[Path], context: ExtractionContext) -> Predictions:
    """The run's predictions for every usable image among the inputs (files or folders)."""
    usable, skipped = list_images(inputs)
    predictions = Predictions(run.class_names, skipped=skipped)
    if not usable:
        return predictions
    from headstart.training.head import predict_from_features

    head = run.head()
    backbone = run.backbone
    engine = context.engine(backbone)
    paths = [str(path) for path in usable]
    features, kept, unusable = apply_to_decoded(
        decoded_batches(paths, backbone.image_size, context.settings.batch_size),
        engine,
    )
    predictions.skipped.extend({"path": paths[index], "reason": reason} for index, reason in unusable)
    if kept:
        predictions.paths = [paths[index] for index in kept]
        predictions.probabilities = predict_from_features(head, features)
    return predictions


def predict_with_tflite(model_path: Path, inputs: list[Path], threads: int | None = None) -> Predictions:
    """Predictions of a .tflite classifier written by `headstart export`, run with LiteRT alone
    (no TensorFlow on this path): images decoded and shrunk as for the exported model's checks."""
    from headstart.edge import TFLiteClassifier, uint8_images

    model = TFLiteClassifier(model_path, threads)
    usable, skipped = list_images(inputs)
    predictions = Predictions(model.class_names, skipped=skipped)
    probabilities, unusable = [], []
    for position, pixels in uint8_images(usable, model.image_size, unusable):
        predictions.paths.append(str(usable[position]))
        probabilities.append(model([pixels]))
    predictions.skipped.extend({"path": str(usable[position]), "reason": reason} for position, reason in unusable)
    if probabilities:
        predictions.probabilities = np.concatenate(probabilities)
    return predictions


def predict_as_configured(config: PredictConfig) -> tuple[Predictions, str]:
    """Predictions on a predict command's or flow's inputs, with the name of the model that made them."""
    settings = ExtractionSettings(config.engine, config.threads, config.batch_size)
    inputs = [Path(path) for path in config.inputs]
    threshold = Threshold(config.min_confidence, config.target_accuracy)
    return predict_with_model(config.model, inputs, config.artifacts_root, config.cache_dir, settings, threshold)


@dataclass(frozen=True)
class Threshold:
    """How the confidence below which an image is UNSURE is set: given as is, chosen on the model's
    validation split for a target accuracy, or (neither given) the one the run was trained with."""

    min_confidence: float | None = None
    target_accuracy: float | None = None

    def for_run(self, run: Run) -> float | None:
        if self.min_confidence is not None:
            return self.min_confidence
        if self.target_accuracy is None:
            return run.unsure_threshold
        confidence, correct = run.confidences("validation")
        threshold = threshold_for_accuracy(confidence, correct, self.target_accuracy)
        if threshold is None:
            reached = float(correct.mean()) if len(correct) else 0.0
            raise HeadstartError(
                f"no confidence threshold reaches accuracy {self.target_accuracy} on the validation split of "
                f"{run.path.name} (its most confident image alone is wrong, or it has none; accuracy of all: "
                f"{reached:.4f}): give a lower --target-accuracy"
            )
        return threshold

    def for_file(self, model: Path) -> float | None:
        if self.target_accuracy is not None:
            raise HeadstartError(
                f"--target-accuracy needs a run's validation split, which {model.name} does not hold: "
                "give --min-confidence, or --model a version"
            )
        return self.min_confidence


def predict_with_model(
    model: str,
    inputs: list[Path],
    artifacts_root: Path,
    cache_dir: Path,
    settings: ExtractionSettings,
    threshold: Threshold = Threshold(),
) -> tuple[Predictions, str]:
    """Predictions by `model`, with its name: a .tflite file written by `headstart export` (run with
    LiteRT alone: TensorFlow is never imported on that path), or 'champion', a version or a run
    directory of the registry under `artifacts_root`; images below the threshold are UNSURE."""
    if model.lower().endswith(".tflite"):
        minimum = threshold.for_file(Path(model))
        predictions = predict_with_tflite(Path(model), inputs, settings.threads)
        return replace(predictions, threshold=minimum), Path(model).name
    from headstart.registry import versions as registry

    run = registry.resolve(artifacts_root, model)
    minimum = threshold.for_run(run)
    # Predicting reads no shared feature: the converted models stay in this machine's own cache.
    with ExtractionContext(local_copy(cache_dir), settings) as context:
        return replace(predict_images(run, inputs, context), threshold=minimum), run.path.name


def check_inputs(inputs) -> None:
    """Inputs of which none is there, said in one line before the model is even loaded."""
    if not any(Path(given).exists() for given in inputs):
        raise HeadstartError(
            f"no image to label: {', '.join(map(str, inputs))} not found; give image files or folders holding images"
        )


def require_images(predictions: Predictions, inputs) -> None:
    """Inputs with no image to label (a path that is not there, a folder of other files) are a
    mistake to say in one line, not an empty result."""
    if predictions.paths:
        return
    skipped = predictions.skipped
    if len(skipped) == 1:
        why = f" ({skipped[0]['path']}: {skipped[0]['reason']})"
    else:
        why = f" ({len(skipped)} skipped, the first {skipped[0]['path']}: {skipped[0]['reason']})" if skipped else ""
    raise HeadstartError(
        f"no image to label in {', '.join(map(str, inputs))}{why}; give image files or folders holding images"
    )


def default_output(artifacts_root: Place, name: str, now: datetime | None = None) -> Path:
    """Where a predict run given no `output` keeps its labels: a CSV under the artifacts root (this
    machine's copy of it, for a registry on a store: `keep_in_store` publishes it), named by the
    time (UTC) and the run, so that runs sort in order and never overwrite each other."""
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%d-%H%M%S")
    return local_copy(artifacts_root) / PREDICTIONS_FOLDER / f"{stamp}-{name}.csv"


def keep_in_store(artifacts_root: Place, output: Path) -> str:
    """The predictions file where people find it: for a registry on a store, uploaded beside it
    (once: a name already there is never overwritten) and named by its URL; else its path."""
    if not is_url(artifacts_root):
        return str(Path(output).resolve())
    name = f"{PREDICTIONS_FOLDER}/{Path(output).name}"
    store = ObjectStore(artifacts_root)
    if not store.create(name, Path(output).read_bytes()):
        raise HeadstartError(f"{store.location(name)} is already there; run the prediction again")
    return store.location(name)


def write_predictions(predictions: Predictions, destination: Path) -> Path:
    """The rows as a .csv or .parquet file, written atomically."""
    destination = Path(destination)
    if destination.suffix.lower() not in OUTPUT_SUFFIXES:
        raise HeadstartError(f"cannot write predictions to {destination}: give a file ending in .csv or .parquet")
    rows = predictions.rows()
    columns = list(rows[0]) if rows else ["path", "label", "probability", "unsure", "guess"]
    table = (
        pa.table({name: [row[name] for row in rows] for name in columns})
        if rows
        else pa.table({name: pa.array([], pa.string()) for name in columns})
    )
    with atomic_path(destination) as temporary:
        if destination.suffix.lower() == ".csv":
            pa_csv.write_csv(table, temporary)
        else:
            pq.write_table(table, temporary)
    return destination
