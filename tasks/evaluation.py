"""Prefect tasks around headstart.evaluation.metrics and headstart.reporting.plots: evaluate and visualize."""

from __future__ import annotations

import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from headstart.backbone.handles import Backbone
from headstart.config import EvaluationConfig
from headstart.errors import HeadstartError, first_line
from headstart.evaluation.metrics import calibrate_classifier, evaluate_split, trust_metrics
from headstart.features.dataset import FeatureSet
from headstart.training.fine_tuning import FineTuningResult


@task(name="calibrate", cache_policy=NO_CACHE)
def calibrate(enabled: bool, classifier, features: FeatureSet) -> dict:
    """Temperature scaling on the validation split, folded into the classifier's head; or, where
    it is off, the record of a temperature of 1."""
    if not enabled:
        return {"temperature": 1.0, "off": True}
    return calibrate_classifier(classifier, features)


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(
    classifier,
    features: FeatureSet,
    class_names: tuple[str, ...],
    calibration: dict | None = None,
    settings: EvaluationConfig = EvaluationConfig(),
) -> tuple[dict, np.ndarray]:
    """Metrics on the test split, with the calibration error and the "unsure" coverage where the
    calibration step's record is given; also returns the test probabilities for the plots."""
    metrics, probabilities = evaluate_split(classifier, features, "test", list(class_names))
    if calibration is not None:
        metrics |= trust_metrics(classifier, features, calibration, settings.target_accuracy)
    return metrics, probabilities


@task(name="visualize", cache_policy=NO_CACHE)
def visualize(
    seed: int,
    history: dict,
    metrics: dict,
    probabilities: np.ndarray,
    features: FeatureSet,
    near_duplicates: dict | None = None,
    fine_tuning: FineTuningResult | None = None,
) -> dict[str, bytes]:
    """Renders the run's plots as PNG bytes, by file name; with the closest test / training pairs
    where `near_duplicates` (the near_duplicates step's report) flagged any, and the fine-tuning
    curves where it ran; `seed` picks the sample images shown."""
    from headstart.reporting.plots import plot_run

    pairs = near_duplicates["splits"]["test"]["pairs"] if near_duplicates is not None else []
    return plot_run(
        history,
        metrics,
        *features.labels_and_paths("test"),
        probabilities,
        seed,
        pairs,
        fine_tuning.history if fine_tuning is not None else None,
    )


@task(name="where_the_model_looked", cache_policy=NO_CACHE)
def where_the_model_looked(
    seed: int,
    backbone: Backbone,
    classifier,
    features: FeatureSet,
    probabilities: np.ndarray,
    class_names: tuple[str, ...],
) -> dict[str, bytes]:
    """Heatmap overlays (class activation maps of the head) of the test split's most confident
    mistakes and of a sample of its correct predictions, as PNG bytes by file name; none, with a
    warning, where the backbone exposes no feature map or an image cannot be read any more."""
    from headstart.reporting.attention_plots import plot_where_the_model_looked
    from headstart.training.head import HEAD_DENSE

    kernel, bias = classifier.get_layer(HEAD_DENSE).get_weights()
    labels, paths = features.labels_and_paths("test")
    try:
        return plot_where_the_model_looked(
            backbone, kernel, bias, labels, paths, probabilities, list(class_names), seed
        )
    except (HeadstartError, OSError) as error:
        get_run_logger().warning("headstart: no heatmaps of where the model looked: %s", first_line(error))
        return {}
