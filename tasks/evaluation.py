"""Prefect tasks around headstart.evaluation and headstart.plots: evaluate and visualize."""

from __future__ import annotations

import contextlib
import importlib
import threading

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from headstart.config import TrainConfig
from headstart.evaluation import classification_metrics
from headstart.features import FeatureSet


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(classifier, features: FeatureSet, class_names: tuple[str, ...]) -> tuple[dict, np.ndarray]:
    """Metrics on the test split; also returns the test probabilities for the plots."""
    from headstart.model import predict_from_features

    probabilities, labels = [], []
    for chunk_features, chunk_labels in features.stream("test").chunks():  # one row group at a time
        probabilities.append(predict_from_features(classifier, chunk_features))
        labels.append(chunk_labels)
    probabilities, labels = np.concatenate(probabilities), np.concatenate(labels)
    return classification_metrics(labels, probabilities, list(class_names)), probabilities


def import_plotting_in_background() -> None:
    """Starts importing matplotlib (~0.4 s) for `visualize` on a thread of its own, to overlap it with the extraction."""
    def import_plots():
        with contextlib.suppress(Exception):  # `visualize` imports it again and reports what failed
            importlib.import_module("headstart.plots")

    threading.Thread(target=import_plots, name="import-plots", daemon=True).start()


@task(name="visualize", cache_policy=NO_CACHE)
def visualize(config: TrainConfig, history: dict, metrics: dict, probabilities: np.ndarray, features: FeatureSet) -> dict[str, bytes]:
    """Renders the run's plots as PNG bytes, by file name."""
    from headstart import plots

    labels, paths = features.labels_and_paths("test")
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
