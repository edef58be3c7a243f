"""Prefect tasks that write run directories and publish them as Prefect artifacts."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from headstart import runs
from headstart.backbone import Backbone
from headstart.config import TrainConfig
from headstart.data import DataReport
from headstart.features import FeatureSet


@task(name="publish", cache_policy=NO_CACHE)
def publish(
    config: TrainConfig, training_key: str, classifier, backbone: Backbone, features: FeatureSet,
    report: DataReport, history: dict, metrics: dict, figures: dict[str, bytes],
) -> str:
    """Writes the run directory atomically and publishes its report to Prefect."""
    writer = runs.RunWriter(config.artifacts_root)
    try:
        writer.save_classifier(classifier, backbone)
        config_values = config.model_dump(mode="json")
        writer.write_json(runs.CLASS_NAMES_FILE, metrics["class_names"])
        writer.write_json(runs.METRICS_FILE, {**metrics, "engine": features.engine, "features_extracted": features.extracted, "features_reused": features.reused})
        writer.write_json(runs.HISTORY_FILE, history)
        writer.write_json(runs.DATA_REPORT_FILE, report.to_dict())
        writer.write_json(runs.CONFIG_FILE, {**config_values, "backbone_fingerprint": backbone.fingerprint, "training_key": training_key})
        for name, png in figures.items():
            writer.write_bytes(f"{runs.PLOTS_DIR}/{name}", png)
        writer.write_bytes(runs.MODEL_CARD_FILE, runs.model_card(config_values, metrics, report.to_dict(), backbone, history, features.engine).encode())
        run_dir = writer.commit()
    except BaseException:
        writer.abandon()
        raise
    runs.record_run(config.cache_dir, training_key, run_dir)
    publish_prefect_artifacts(run_dir)
    return str(run_dir)


@task(name="reuse_identical_run", cache_policy=NO_CACHE)
def reuse_identical_run(config: TrainConfig, previous: Path) -> str:
    """Copies an earlier run whose inputs were all identical: training would reproduce it exactly."""
    get_run_logger().info("Every input matches run %s; copying it instead of retraining (--no-reuse to retrain)", previous)
    writer = runs.RunWriter(config.artifacts_root)
    try:
        writer.copy_run(previous)
        run_dir = writer.commit()
    except BaseException:
        writer.abandon()
        raise
    publish_prefect_artifacts(run_dir)
    return str(run_dir)


def publish_prefect_artifacts(run_dir: Path) -> None:
    """A markdown report with the plots embedded as data URIs, and a table of the metrics."""
    metrics = json.loads((run_dir / runs.METRICS_FILE).read_text())
    card = (run_dir / runs.MODEL_CARD_FILE).read_text()
    images = "\n\n".join(
        f"### {png.stem.replace('_', ' ')}\n\n![{png.name}]({runs.png_data_uri(png.read_bytes())})"
        for png in sorted((run_dir / runs.PLOTS_DIR).glob("*.png"))
    )
    files = "\n".join(f"- [{name}]({(run_dir / name).as_uri()})" for name in (
        runs.MODEL_FILE, runs.SERVING_DIR, runs.METRICS_FILE, runs.HISTORY_FILE, runs.CLASS_NAMES_FILE, runs.MODEL_CARD_FILE, runs.DATA_REPORT_FILE))
    create_markdown_artifact(
        key="headstart-report",
        markdown=f"# headstart run `{run_dir.name}`\n\nTest accuracy **{metrics['accuracy']:.4f}** on {metrics['n']} images.\n\n{images}\n\n## Files\n\nRun directory: `{run_dir}`\n\n{files}\n\n{card}",
        description=f"Training report, test accuracy {metrics['accuracy']:.4f}",
    )
    rows = [{"class": name, **{k: round(v, 4) if isinstance(v, float) else v for k, v in values.items()}} for name, values in metrics["per_class"].items()]
    rows.append({"class": "(all)", "precision": None, "recall": None, "f1": round(metrics["macro_f1"], 4), "support": metrics["n"], "accuracy": round(metrics["accuracy"], 4)})
    create_table_artifact(key="headstart-metrics", table=rows, description="Test-split metrics per class")
