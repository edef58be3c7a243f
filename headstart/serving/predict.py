"""Batch prediction with a trained run: image files and folders → label, probability, top classes.

Images take the path training's features took: decoded and shrunk as in extraction, the fast
engine (LiteRT where it passes its parity check) on the run's own backbone, then the run's head.
A file that cannot be used is listed with its reason, never fatal.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
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
from headstart.features.extraction import ExtractionContext, ExtractionSettings
from headstart.infra.object_store import ObjectStore, local_copy
from headstart.infra.storage import atomic_path
from headstart.registry.runs import Run

# Classes listed per image, most probable first, where a model has more than two.
TOP_K = 3
OUTPUT_SUFFIXES = (".csv", ".parquet")
# Under the artifacts root: the labels of predict runs given no output (default_output).
PREDICTIONS_FOLDER = "predictions"


@dataclass
class Predictions:
    class_names: list[str]
    paths: list[str] = field(default_factory=list)
    probabilities: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    skipped: list[dict[str, str]] = field(default_factory=list)

    def rows(self) -> list[dict]:
        """path, label, probability; and the top classes with theirs where there are more than two."""
        rows = []
        for path, probabilities in zip(self.paths, self.probabilities):
            order = np.argsort(-probabilities, kind="stable")
            row = {"path": path, "label": self.class_names[order[0]], "probability": float(probabilities[order[0]])}
            if len(self.class_names) > 2:
                for rank, index in enumerate(order[:TOP_K], start=1):
                    row[f"top{rank}_label"], row[f"top{rank}_probability"] = (
                        self.class_names[index],
                        float(probabilities[index]),
                    )
            rows.append(row)
        return rows

    def counts(self) -> dict[str, int]:
        """Images per predicted label, every class listed."""
        predicted = (
            Counter(self.class_names[index] for index in self.probabilities.argmax(axis=1))
            if len(self.paths)
            else Counter()
        )
        return {name: predicted.get(name, 0) for name in self.class_names}


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
    return predict_with_model(config.model, inputs, config.artifacts_root, config.cache_dir, settings)


def predict_with_model(
    model: str, inputs: list[Path], artifacts_root: Path, cache_dir: Path, settings: ExtractionSettings
) -> tuple[Predictions, str]:
    """Predictions by `model`, with its name: a .tflite file written by `headstart export` (run with
    LiteRT alone: TensorFlow is never imported on that path), or 'champion', a version or a run
    directory of the registry under `artifacts_root`."""
    if model.lower().endswith(".tflite"):
        return predict_with_tflite(Path(model), inputs, settings.threads), Path(model).name
    from headstart.registry import versions as registry

    run = registry.resolve(artifacts_root, model)
    # Predicting reads no shared feature: the converted models stay in this machine's own cache.
    with ExtractionContext(local_copy(cache_dir), settings) as context:
        return predict_images(run, inputs, context), run.path.name


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
    columns = list(rows[0]) if rows else ["path", "label", "probability"]
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
