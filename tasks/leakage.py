"""Prefect task around headstart.evaluation.near_duplicates: near_duplicates."""

from __future__ import annotations

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from headstart.config import EvaluationConfig
from headstart.evaluation.near_duplicates import find_near_duplicates, near_duplicate_report
from headstart.features.dataset import FeatureSet
from headstart.registry.model_card import near_duplicates_summary


@task(name="near_duplicates", cache_policy=NO_CACHE)
def near_duplicates(
    settings: EvaluationConfig, features: FeatureSet, probabilities: np.ndarray, class_names: tuple[str, ...]
) -> dict:
    """Test and validation images whose nearest training image is a near-duplicate, from the cached
    features, and the test accuracy with and without them (as the data report records it)."""
    check = find_near_duplicates(features, list(class_names), settings.near_duplicate_threshold)
    report = near_duplicate_report(check, features, probabilities)
    get_run_logger().info("%s", near_duplicates_summary(report).replace("**", ""))
    return report
