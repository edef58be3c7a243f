"""Writing a run directory: everything one training run leaves behind, atomically.

A run is assembled in a hidden staging directory and renamed into place at the very end, so a
crash never leaves a half-written run: either the whole directory is there or none of it. Every
file inside is written to a temporary file and renamed. TensorFlow is imported only where a model
is saved.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import shutil
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import pyarrow as pa

from headstart import __version__
from headstart.backbone.handles import Backbone
from headstart.config import is_url
from headstart.evaluation.drift import data_index, feature_reference
from headstart.evaluation.metrics import split_confidences
from headstart.infra.object_store import local_copy
from headstart.infra.storage import write_bytes_atomic, write_json_atomic, write_parquet_atomic, writing_under
from headstart.registry import published
from headstart.registry.lineage import BackboneLineage, DataLineage, Lineage, Scores, SplitFingerprint, copied_lineage
from headstart.registry.model_card import model_card
from headstart.registry.runs import (
    BACKBONE_DIR,
    CLASS_NAMES_FILE,
    CONFIDENCE_FILE,
    CONFIG_FILE,
    DATA_INDEX_FILE,
    DATA_REPORT_FILE,
    HISTORY_FILE,
    INT8_BACKBONE_FILE,
    LABEL_ISSUES_FILE,
    LINEAGE_FILE,
    METRICS_FILE,
    MODEL_CARD_FILE,
    MODEL_FILE,
    PLOTS_DIR,
    SERVING_DIR,
)

if TYPE_CHECKING:
    from headstart.config import TrainConfig
    from headstart.evaluation.label_issues import LabelIssues
    from headstart.features.dataset import FeatureSet
    from headstart.training.fine_tuning import FineTuningResult

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
    In a registry on a store, the run is committed in this machine's copy of it, then published
    (headstart.registry.published).
    """

    def __init__(self, artifacts_root: Path | str):
        self.created_at = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
        self.name = self.created_at.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
        self.store_root = artifacts_root if is_url(artifacts_root) else None
        self.root = local_copy(artifacts_root)
        self.final = (self.root / self.name).resolve()
        remove_abandoned_staging(self.root)
        if self.store_root is not None:
            published.remove_abandoned(self.store_root)
        self.staging = self.root / f".{self.name}{PARTIAL_SUFFIX}"
        self.staging.mkdir(parents=True, exist_ok=False)
        try:
            with writing_under(self.root):
                self._claim()
        except BaseException:
            shutil.rmtree(self.staging, ignore_errors=True)
            raise

    def _claim(self) -> None:
        """Marks the staging directory as this process's, so that no other run removes it as abandoned."""
        (self.staging / OWNER_FILE).write_text(f"{socket.gethostname()} {os.getpid()}")

    def __enter__(self) -> "RunWriter":
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        if exc_type is None:
            (self.staging / OWNER_FILE).unlink(missing_ok=True)
            os.replace(self.staging, self.final)
            if self.store_root is not None:
                published.publish(self.store_root, self.final)
        else:
            shutil.rmtree(self.staging, ignore_errors=True)
            if isinstance(exc_value, OSError) and exc_value.filename is None and exc_value.errno is not None:
                # A write that failed on a full disk names no file: the error names the registry.
                with writing_under(self.root):
                    raise exc_value

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
    artifacts_root: Path | str,
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
    sweep: list[dict] | None = None,
    label_issues: "LabelIssues | None" = None,
) -> Path:
    """Writes a trained run's directory (every one of RUN_FILES) atomically; returns its path.
    `near_duplicates` (headstart.evaluation.near_duplicates.near_duplicate_report) goes into the data report, its
    test-split figures into metrics.json and the model card. `fine_tuning`, where the backbone was
    fine-tuned, goes into history.json (its history) and metrics.json and the model card (its summary);
    `sweep` (every head setting tried, headstart.training.sweep) into metrics.json;
    `label_issues`, where the run looked for wrong labels, is label_issues.parquet, its summary in metrics.json."""
    config_values = config.flat()
    if sweep is not None:
        metrics = {**metrics, "sweep": sweep}
    if "class_weights" in history:
        metrics = {**metrics, "class_weights": dict(zip(metrics["class_names"], history["class_weights"]))}
    if near_duplicates is not None:
        data_report = {**data_report, "near_duplicates": near_duplicates}
        metrics = {**metrics, "near_duplicates": near_duplicate_metrics(near_duplicates)}
    if fine_tuning is not None:
        history = {**history, "fine_tuning": fine_tuning.history}
        metrics = {**metrics, "fine_tuning": fine_tuning.summary.to_dict()}
    if label_issues is not None:
        metrics = {**metrics, "label_issues": label_issues.summary}
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
        write_parquet_atomic(writer.staging / CONFIDENCE_FILE, confidence_table(classifier, features))
        if label_issues is not None:
            write_parquet_atomic(writer.staging / LABEL_ISSUES_FILE, label_issues.table)
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


def copy_run(artifacts_root: Path | str, previous: Path, flow_run_id: str | None = None) -> Path:
    """A new run directory holding an earlier run's files, its config and lineage marked `reused_from`."""
    with RunWriter(artifacts_root) as writer:
        writer.copy_run(previous, flow_run_id)
    return writer.final


def confidence_table(classifier, features: "FeatureSet") -> pa.Table:
    """The validation and test images' top probabilities under the run's (calibrated) model, and
    whether each was right (CONFIDENCE_FILE)."""
    confidences = split_confidences(classifier, features)
    return pa.table(
        {
            "split": [split for split, (confidence, _) in confidences.items() for _ in confidence],
            "confidence": np.concatenate([confidence for confidence, _ in confidences.values()]),
            "correct": np.concatenate([correct for _, correct in confidences.values()]).astype(bool),
        }
    )


def near_duplicate_metrics(near_duplicates: dict) -> dict:
    """The test split's near-duplicate figures, without the pairs: what metrics.json holds."""
    test = near_duplicates["splits"]["test"]
    return {
        "threshold": near_duplicates["threshold"],
        "flagged": test["flagged"],
        "accuracy_without_flagged": test["accuracy_without_flagged"],
        "n_without_flagged": test["n_without_flagged"],
    }
