"""Prefect tasks around headstart.evaluation.metrics and headstart.reporting.plots: evaluate and visualize."""

from __future__ import annotations

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from headstart.evaluation.metrics import evaluate_split
from headstart.features.dataset import FeatureSet
from headstart.training.fine_tuning import FineTuningResult


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(classifier, features: FeatureSet, class_names: tuple[str, ...]) -> tuple[dict, np.ndarray]:
    """Metrics on the test split; also returns the test probabilities for the plots."""
    return evaluate_split(classifier, features, "test", list(class_names))


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
