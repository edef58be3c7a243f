"""Prefect tasks around headstart.evaluation and headstart.plots: evaluate, visualize and publish."""

from __future__ import annotations

import numpy as np
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from headstart.backbone import Backbone
from headstart.config import TrainConfig
from headstart.data import DataReport
from headstart.evaluation import classification_metrics
from headstart.features import FeatureSet
from headstart.keras import keras
from headstart.model import predict_from_features
from headstart import plots, runs


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(classifier: keras.Model, features: FeatureSet, class_names: tuple[str, ...]) -> tuple[dict, np.ndarray]:
    """Metrics on the test split; also returns the test probabilities for the plots."""
    test_features, labels, _ = features.load("test")
    probabilities = predict_from_features(classifier, test_features)
    return classification_metrics(labels, probabilities, list(class_names)), probabilities


@task(name="visualize", cache_policy=NO_CACHE)
def visualize(config: TrainConfig, history: dict, metrics: dict, probabilities: np.ndarray, features: FeatureSet) -> dict[str, bytes]:
    """Renders the run's plots as PNG bytes, by file name."""
    _, labels, paths = features.load("test")
    samples = plots.sample_indices(len(paths), 12, config.seed)
    mistakes = plots.confident_mistake_indices(labels, probabilities, 12)
    names = metrics["class_names"]
    return {
        "training_curves.png": plots.plot_training_curves(history),
        "confusion_matrix.png": plots.plot_confusion_matrix(metrics["confusion_matrix"], names),
        "sample_predictions.png": plots.plot_prediction_grid(
            [paths[i] for i in samples], labels[samples], probabilities[samples], names, "Sample test predictions"),
        "confident_mistakes.png": plots.plot_prediction_grid(
            [paths[i] for i in mistakes], labels[mistakes], probabilities[mistakes], names, "Most confident mistakes"),
    }


@task(name="publish", cache_policy=NO_CACHE)
def publish(
    config: TrainConfig, classifier: keras.Model, backbone: Backbone, features: FeatureSet,
    report: DataReport, history: dict, metrics: dict, figures: dict[str, bytes],
) -> str:
    """Writes the run directory atomically and publishes the report to Prefect."""
    writer = runs.RunWriter(config.artifacts_root)
    try:
        writer.save_classifier(classifier, backbone)
        config_values = config.model_dump(mode="json")
        writer.write_json(runs.CLASS_NAMES_FILE, metrics["class_names"])
        writer.write_json(runs.METRICS_FILE, {**metrics, "engine": features.engine, "features_extracted": features.extracted, "features_reused": features.reused})
        writer.write_json(runs.HISTORY_FILE, history)
        writer.write_json(runs.DATA_REPORT_FILE, report.to_dict())
        writer.write_json(runs.CONFIG_FILE, {**config_values, "backbone_fingerprint": backbone.fingerprint})
        for name, png in figures.items():
            writer.write_bytes(f"{runs.PLOTS_DIR}/{name}", png)
        card = runs.model_card(config_values, metrics, report.to_dict(), backbone, history, features.engine)
        writer.write_bytes(runs.MODEL_CARD_FILE, card.encode())
        run_dir = writer.commit()
    except BaseException:
        writer.abandon()
        raise
    _publish_prefect_artifacts(run_dir, metrics, figures, card)
    return str(run_dir)


def _publish_prefect_artifacts(run_dir, metrics: dict, figures: dict[str, bytes], card: str) -> None:
    images = "\n\n".join(f"### {name.removesuffix('.png').replace('_', ' ')}\n\n![{name}]({runs.png_data_uri(png)})" for name, png in figures.items())
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
