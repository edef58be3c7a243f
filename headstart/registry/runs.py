"""Run directories: everything one training run leaves behind, written atomically, and read back.

A run is assembled in a hidden staging directory and renamed into place at the very end, so a
crash never leaves a half-written run: either the whole directory is there or none of it. Every
file inside is written to a temporary file and renamed. `RUN_FILES` is the list of what a
complete run holds; `Run` reads one. TensorFlow is imported only where a model is saved or
loaded, so that reading a run's figures stays cheap.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import shutil
import socket
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import pyarrow.parquet as pq

from headstart import __version__
from headstart.backbone.handles import Backbone
from headstart.errors import HeadstartError
from headstart.evaluation.drift import data_index, feature_reference
from headstart.infra.storage import write_bytes_atomic, write_json_atomic, write_parquet_atomic
from headstart.registry.lineage import BackboneLineage, DataLineage, Lineage, Scores, SplitFingerprint, copied_lineage
from headstart.training.fine_tuning import FineTuningSummary

if TYPE_CHECKING:
    from headstart.config import TrainConfig
    from headstart.features.dataset import FeatureSet
    from headstart.training.fine_tuning import FineTuningResult

MODEL_FILE = "model.keras"
SERVING_DIR = "saved_model"
BACKBONE_DIR = "backbone"
# The backbone quantized to int8, in a run trained on its features: what predicts with the run.
INT8_BACKBONE_FILE = "backbone-int8.tflite"
CLASS_NAMES_FILE = "class_names.json"
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.json"
DATA_REPORT_FILE = "data_report.json"
CONFIG_FILE = "config.json"
MODEL_CARD_FILE = "MODEL_CARD.md"
LINEAGE_FILE = "lineage.json"
DATA_INDEX_FILE = "data_index.parquet"
PLOTS_DIR = "plots"
# Everything a run holds.
RUN_FILES = (
    MODEL_FILE,
    SERVING_DIR,
    BACKBONE_DIR,
    CLASS_NAMES_FILE,
    METRICS_FILE,
    HISTORY_FILE,
    DATA_REPORT_FILE,
    CONFIG_FILE,
    MODEL_CARD_FILE,
    LINEAGE_FILE,
    DATA_INDEX_FILE,
    PLOTS_DIR,
)
# What a complete run holds: runs written before the data index existed are complete too.
REQUIRED_RUN_FILES = tuple(name for name in RUN_FILES if name != DATA_INDEX_FILE)


# --- writing a run ---------------------------------------------------------------------------------

PARTIAL_SUFFIX = ".partial"
OWNER_FILE = ".owner"  # host and process id of the writer of a staging directory


def remove_abandoned_staging(artifacts_root: Path) -> list[Path]:
    """Removes the staging directories whose writer died before renaming them into place (a
    killed run): those written on this host by a process that no longer runs. Returns them."""
    removed = []
    host = socket.gethostname()
    for staging in Path(artifacts_root).glob(f".*{PARTIAL_SUFFIX}") if Path(artifacts_root).is_dir() else []:
        try:
            owner_host, pid = (staging / OWNER_FILE).read_text().split()
        except (OSError, ValueError):
            continue  # no owner yet: being created right now, or not ours to judge
        if owner_host == host and not _process_runs(int(pid)):
            shutil.rmtree(staging, ignore_errors=True)
            removed.append(staging)
    return removed


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class RunWriter:
    """Collects a run's files in a staging directory. As a context manager it renames the
    directory to its final name when the block succeeds, and removes it when the block fails.

    The name is the run's version in the registry: its UTC creation time and a random suffix.
    """

    def __init__(self, artifacts_root: Path):
        self.created_at = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
        self.name = self.created_at.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
        self.root = Path(artifacts_root)
        self.final = (self.root / self.name).resolve()
        remove_abandoned_staging(self.root)
        self.staging = self.root / f".{self.name}{PARTIAL_SUFFIX}"
        self.staging.mkdir(parents=True, exist_ok=False)
        self._claim()

    def _claim(self) -> None:
        """Marks the staging directory as this process's, so that no other run removes it as abandoned."""
        (self.staging / OWNER_FILE).write_text(f"{socket.gethostname()} {os.getpid()}")

    def __enter__(self) -> "RunWriter":
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        if exc_type is None:
            (self.staging / OWNER_FILE).unlink(missing_ok=True)
            os.replace(self.staging, self.final)
        else:
            shutil.rmtree(self.staging, ignore_errors=True)

    def write_json(self, relative: str, value) -> Path:
        write_json_atomic(self.staging / relative, value)
        return self.final / relative

    def write_bytes(self, relative: str, data: bytes) -> Path:
        write_bytes_atomic(self.staging / relative, data)
        return self.final / relative

    def save_classifier(self, classifier, backbone: Backbone) -> None:
        """Saves the end-to-end model as .keras and as a self-contained serving SavedModel."""
        from headstart.infra.keras import tf

        shutil.copytree(backbone.module_path, self.staging / BACKBONE_DIR)
        if backbone.litert_model is not None:
            shutil.copyfile(backbone.litert_model, self.staging / INT8_BACKBONE_FILE)
        classifier.save(self.staging / MODEL_FILE)

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32, name="images")])
        def serve(images):
            return {"probabilities": classifier(images, training=False)}

        # A bare module holding the signature and the variables it captures: saving the Keras
        # model itself would also serialise every layer, which took 2.3× as long to save and
        # 4× as long to load.
        serving = tf.Module()
        serving.serve = serve
        serving.model_variables = list(classifier.variables)
        tf.saved_model.save(serving, str(self.staging / SERVING_DIR), signatures={"serving_default": serve})

    def copy_run(self, previous: Path, flow_run_id: str | None = None) -> None:
        """Fills the staging directory with an earlier run's files (hard links where possible)."""

        def link_or_copy(source, destination):
            try:
                os.link(source, destination)
            except OSError:
                shutil.copy2(source, destination)

        shutil.rmtree(self.staging)
        shutil.copytree(previous, self.staging, copy_function=link_or_copy)
        self._claim()
        self._rewrite(CONFIG_FILE, lambda config: {**config, "reused_from": str(previous)})
        self._rewrite(
            LINEAGE_FILE,
            lambda lineage: copied_lineage(
                lineage, self.name, self.created_at.isoformat(), flow_run_id, reused_from=str(previous)
            ),
        )

    def _rewrite(self, relative: str, change: Callable[[dict], dict]) -> None:
        """Replaces a JSON file copied from an earlier run by what `change` makes of it."""
        value = json.loads((self.staging / relative).read_text())
        (self.staging / relative).unlink()  # a link: rewrite it without touching the earlier run
        self.write_json(relative, change(value))

    def lineage(
        self,
        *,
        config_values: dict,
        training_key: str,
        backbone: Backbone,
        features: "FeatureSet",
        data_report: dict,
        metrics: dict,
        flow_run_id: str | None,
        gate: dict | None,
    ) -> Lineage:
        """Where this run's model came from, for the registry: data, classes, backbone, parameters, version, metrics,
        and the promotion gate's decision (None where the gate was off)."""
        return Lineage(
            version=self.name,
            created_at=self.created_at.isoformat(),
            headstart=__version__,
            flow_run_id=flow_run_id,
            data=DataLineage(
                data_report["source"],
                {split: SplitFingerprint.of(hashes) for split, hashes in features.content_hashes().items()},
            ),
            class_names=metrics["class_names"],
            backbone=BackboneLineage(backbone.handle, backbone.fingerprint, backbone.image_size),
            parameters=config_values,
            training_key=training_key,
            metrics=Scores(metrics["accuracy"], metrics["n"], metrics["macro_f1"]),
            gate=gate,
            feature_reference=feature_reference(features, backbone),
        )


def write_run(
    artifacts_root: Path,
    *,
    config: "TrainConfig",
    training_key: str,
    classifier,
    backbone: Backbone,
    features: "FeatureSet",
    data_report: dict,
    history: dict,
    metrics: dict,
    figures: dict[str, bytes],
    flow_run_id: str | None = None,
    gate: dict | None = None,
    near_duplicates: dict | None = None,
    fine_tuning: "FineTuningResult | None" = None,
) -> Path:
    """Writes a trained run's directory (every one of RUN_FILES) atomically; returns its path.
    `near_duplicates` (headstart.evaluation.near_duplicates.near_duplicate_report) goes into the data report, its
    test-split figures into metrics.json and the model card. `fine_tuning`, where the backbone was
    fine-tuned, goes into history.json (its history) and metrics.json and the model card (its summary)."""
    config_values = config.flat()
    if near_duplicates is not None:
        data_report = {**data_report, "near_duplicates": near_duplicates}
        metrics = {**metrics, "near_duplicates": near_duplicate_metrics(near_duplicates)}
    if fine_tuning is not None:
        history = {**history, "fine_tuning": fine_tuning.history}
        metrics = {**metrics, "fine_tuning": fine_tuning.summary.to_dict()}
    with RunWriter(artifacts_root) as writer:
        lineage = writer.lineage(
            config_values=config_values,
            training_key=training_key,
            backbone=backbone,
            features=features,
            data_report=data_report,
            metrics=metrics,
            flow_run_id=flow_run_id,
            gate=gate,
        )
        writer.write_json(LINEAGE_FILE, lineage.to_dict())
        writer.save_classifier(classifier, backbone)
        write_parquet_atomic(writer.staging / DATA_INDEX_FILE, data_index(features, metrics["class_names"]))
        writer.write_json(CLASS_NAMES_FILE, metrics["class_names"])
        writer.write_json(
            METRICS_FILE,
            {
                **metrics,
                "engine": features.engine,
                "features_extracted": features.extracted,
                "features_reused": features.reused,
            },
        )
        writer.write_json(HISTORY_FILE, history)
        writer.write_json(DATA_REPORT_FILE, data_report)
        writer.write_json(
            CONFIG_FILE, {**config_values, "backbone_fingerprint": backbone.fingerprint, "training_key": training_key}
        )
        for name, png in figures.items():
            writer.write_bytes(f"{PLOTS_DIR}/{name}", png)
        writer.write_bytes(
            MODEL_CARD_FILE,
            model_card(
                config_values,
                metrics,
                data_report,
                backbone,
                history,
                features.engine,
                fine_tuning.summary if fine_tuning is not None else None,
            ).encode(),
        )
    return writer.final


def copy_run(artifacts_root: Path, previous: Path, flow_run_id: str | None = None) -> Path:
    """A new run directory holding an earlier run's files, its config and lineage marked `reused_from`."""
    with RunWriter(artifacts_root) as writer:
        writer.copy_run(previous, flow_run_id)
    return writer.final


def near_duplicate_metrics(near_duplicates: dict) -> dict:
    """The test split's near-duplicate figures, without the pairs: what metrics.json holds."""
    test = near_duplicates["splits"]["test"]
    return {
        "threshold": near_duplicates["threshold"],
        "flagged": test["flagged"],
        "accuracy_without_flagged": test["accuracy_without_flagged"],
        "n_without_flagged": test["n_without_flagged"],
    }


def near_duplicates_summary(near_duplicates: dict | None) -> str:
    """One paragraph on the test split's near-duplicates of training images (and validation's), for the
    card and the report."""
    if near_duplicates is None:
        return "Not checked."
    threshold, splits = near_duplicates["threshold"], near_duplicates["splits"]
    test = splits["test"]
    if not test["flagged"]:
        text = (
            "No test image has a near-duplicate in the training split: "
            f"none of the {test['images']} reaches a cosine similarity of {threshold} "
            "to its nearest training image (backbone features)."
        )
    else:
        without = test["accuracy_without_flagged"]
        without_text = (
            f"**{without:.4f}** on the other {test['n_without_flagged']}"
            if without is not None
            else "undefined (every test image is flagged)"
        )
        text = (
            f"**{test['flagged']}** of {test['images']} test images are near-duplicates of a training image "
            f"(cosine similarity of backbone features ≥ {threshold}; listed in `{DATA_REPORT_FILE}`): "
            f"test accuracy {test['accuracy']:.4f} with them, "
            f"{without_text} without them."
        )
    if "validation" in splits:
        validation = splits["validation"]
        text += f" Validation (early stopping): {validation['flagged']} of {validation['images']} images flagged."
    return text


def fine_tuning_line(config: dict, summary: FineTuningSummary | None) -> str:
    """The model card's line on fine-tuning, where it ran."""
    if summary is None:
        return ""
    augmentations = (
        ("horizontal flips", summary.flip),
        (
            f"shifts of up to {summary.shift:.0%} of the side ({summary.shift_cells} cells)",
            summary.shift_cells,
        ),
        (f"mixup (alpha {summary.mixup})", summary.mixup),
        (f"CutMix (alpha {summary.cutmix})", summary.cutmix),
    )
    augmentation = ", ".join(name for name, on in augmentations if on)
    return (
        f"\n- Fine-tuned: stages {summary.from_stage}–18 of the backbone, with the head, "
        f"on activations cached at their input "
        f"({'×'.join(map(str, summary.activation_shape))}, {summary.activation_dtype}); "
        f"{summary.epochs_run} epochs "
        f"(Adam, learning rate {config['fine_tune_learning_rate']} after a one-epoch warm-up, decaying on a cosine; "
        f"augmentation: {augmentation or 'none'}), "
        f"epoch {summary.best_epoch} kept: validation accuracy {summary.validation_accuracy_before:.4f} "
        f"with the head alone, "
        f"{summary.validation_accuracy_after:.4f} fine-tuned. Base backbone `{summary.base_backbone.handle}` "
        f"(fingerprint `{summary.base_backbone.fingerprint}`); "
        f"the stages below {summary.from_stage} are its own, unchanged."
        + (
            " The fine-tuned backbone averages the features of each image and of its mirror image."
            if summary.mirror_average
            else ""
        )
    )


def model_card(
    config: dict,
    metrics: dict,
    data_report: dict,
    backbone: Backbone,
    history: dict,
    engine: str,
    fine_tuning: FineTuningSummary | None = None,
) -> str:
    """The card of a run from its configuration values, test metrics, data report (with its
    near-duplicates, where checked), backbone, head history, feature engine and fine-tuning."""
    counts = data_report["counts"]
    split_lines = "\n".join(
        f"| {split} | "
        + " | ".join(str(counts[split][name]) for name in data_report["class_names"])
        + f" | {sum(counts[split].values())} |"
        for split in ("train", "validation", "test")
    )
    per_class = "\n".join(
        f"| {name} | {values['precision']:.4f} | {values['recall']:.4f} | {values['f1']:.4f} | {values['support']} |"
        for name, values in metrics["per_class"].items()
    )
    state = "fine-tuned" if fine_tuning is not None else "frozen"
    side, classes, epochs = backbone.image_size, len(data_report["class_names"]), len(history.get("loss", []))
    training = f"learning rate {config['learning_rate']}, batch size {config['batch_size']}, seed {config['seed']}"
    tuned = fine_tuning_line(config, fine_tuning)
    notes = "".join(f"\n- {note}" for note in data_report["notes"])
    return f"""# Model card

An image classifier for {", ".join(data_report["class_names"])}, trained by headstart.

## Model
- Backbone: `{backbone.handle}` (fingerprint `{backbone.fingerprint}`), {state}, ImageNet-pretrained; \
input {side}×{side} px.
- Head: Dropout({config["dropout"]}) → Dense({classes}, softmax), trained for {epochs} epochs
  ({training}), on features from the {engine} engine.{tuned}
- Input: RGB images of any size, pixel values 0–255; output: one probability per class in the order of \
`{CLASS_NAMES_FILE}`.

## Data
Source: `{data_report["source"]}`. Splits are assigned by image content hash and never change between runs.

| split | {" | ".join(data_report["class_names"])} | total |
|---|{"---|" * len(data_report["class_names"])}---|
{split_lines}

{len(data_report["skipped"])} files were skipped (see `{DATA_REPORT_FILE}`).{notes}

## Evaluation on the test split
Accuracy **{metrics["accuracy"]:.4f}** on {metrics["n"]} images, macro F1 {metrics["macro_f1"]:.4f}.

| class | precision | recall | F1 | support |
|---|---|---|---|---|
{per_class}

## Near-duplicates of training images
{near_duplicates_summary(data_report.get("near_duplicates"))}

## Limits
The backbone saw ImageNet photos; images far from that (medical scans, drawings, tiny
thumbnails upscaled from {backbone.image_size} px or less) may classify worse than these figures.
Accuracy is measured on held-out images of the same source, not on the world at large.
"""


# --- reading a run ---------------------------------------------------------------------------------


class Run:
    """A finished run directory, read on demand: its classes, figures, configuration and models."""

    def __init__(self, path: Path):
        self.path = Path(path)
        for required in (CLASS_NAMES_FILE, CONFIG_FILE):
            if not (self.path / required).is_file():
                raise HeadstartError(f"{self.path} is not a headstart run directory (no {required})")

    @classmethod
    def if_complete(cls, path: Path) -> "Run | None":
        """The run at path where it holds every one of REQUIRED_RUN_FILES; else None."""
        return cls(path) if all((Path(path) / name).exists() for name in REQUIRED_RUN_FILES) else None

    def _json(self, name: str):
        return json.loads((self.path / name).read_text())

    @cached_property
    def class_names(self) -> list[str]:
        return self._json(CLASS_NAMES_FILE)

    @cached_property
    def config(self) -> dict:
        return self._json(CONFIG_FILE)

    @cached_property
    def metrics(self) -> dict:
        return self._json(METRICS_FILE)

    def update_metrics(self, change: Callable[[dict], dict]) -> dict:
        """Rewrites metrics.json (atomically) as `change` makes it from what the file holds now,
        read afresh rather than from this Run's copy, since another writer (an export) may have
        written since; returns the new metrics, which this Run reads from then on."""
        metrics = change(self._json(METRICS_FILE))
        write_json_atomic(self.path / METRICS_FILE, metrics)
        self.__dict__["metrics"] = metrics
        return metrics

    @property
    def fine_tuning(self) -> FineTuningSummary | None:
        """What fine-tuning did, where the run fine-tuned its backbone; else None."""
        written = self.metrics.get("fine_tuning")
        return FineTuningSummary.from_dict(written) if written is not None else None

    @cached_property
    def history(self) -> dict:
        return self._json(HISTORY_FILE)

    @cached_property
    def data_report(self) -> dict:
        return self._json(DATA_REPORT_FILE)

    @cached_property
    def lineage(self) -> Lineage | None:
        """The lineage record; None for a run written before runs had one."""
        return Lineage.from_dict(self._json(LINEAGE_FILE)) if (self.path / LINEAGE_FILE).is_file() else None

    def data_index(self):
        """Each training image's content hash, class and split (a pyarrow Table); None for a run
        written before runs kept one."""
        path = self.path / DATA_INDEX_FILE
        return pq.read_table(path) if path.is_file() else None

    def split_hashes(self, split: str) -> set[str] | None:
        """Content hashes of the images the run had in a split (from its data index); None for a
        run written before runs kept one."""
        index = self.data_index()
        if index is None:
            return None
        return {
            sha
            for sha, in_split in zip(index.column("sha256").to_pylist(), index.column("split").to_pylist())
            if in_split == split
        }

    @property
    def image_size(self) -> int:
        return int(self.config["image_size"])

    @property
    def backbone(self) -> Backbone:
        """The backbone module the run's model holds, under the fingerprint it was trained with; with
        the int8 model that made its features where it was trained on the litert-int8 engine."""
        int8_model = self.path / INT8_BACKBONE_FILE
        return Backbone(
            handle=self.config["backbone"],
            module_path=self.path / BACKBONE_DIR,
            fingerprint=self.config["backbone_fingerprint"],
            image_size=self.image_size,
            litert_model=int8_model if int8_model.is_file() else None,
        )

    @property
    def model_card(self) -> str:
        return (self.path / MODEL_CARD_FILE).read_text()

    def plots(self) -> list[Path]:
        return sorted((self.path / PLOTS_DIR).glob("*.png"))

    def serving_model(self):
        """The self-contained serving SavedModel, as a function images (0–255) → probabilities."""
        serving = self.path / SERVING_DIR
        if not (serving / "saved_model.pb").is_file():
            raise HeadstartError(f"{self.path} has no serving model ({SERVING_DIR}/saved_model.pb)")
        from headstart.infra.keras import tf

        signature = tf.saved_model.load(str(serving)).signatures["serving_default"]

        def predict(images: np.ndarray) -> np.ndarray:
            return signature(images=tf.convert_to_tensor(images, tf.float32))["probabilities"].numpy()

        return predict

    def keras_model(self):
        """The .keras model, its backbone taken from the run directory itself."""
        from headstart.infra.keras import hub, keras
        from headstart.training.head import ImagePreprocessing

        module = str(self.path / BACKBONE_DIR)

        class RunBackbone(hub.KerasLayer):
            @classmethod
            def from_config(cls, layer_config):
                return hub.KerasLayer(**{**layer_config, "handle": module})

        return keras.models.load_model(
            self.path / MODEL_FILE,
            custom_objects={"KerasLayer": RunBackbone, "ImagePreprocessing": ImagePreprocessing},
        )
