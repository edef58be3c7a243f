"""Prefect tasks around headstart.promotion.decide and headstart.registry.versions: gate, promote."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from headstart.backbone.handles import Backbone
from headstart.config import TrainConfig
from headstart.features.dataset import FeatureSet
from headstart.promotion import decide as promotion
from headstart.promotion.mcnemar import GateDecision
from headstart.registry import versions as registry
from headstart.registry.runs import Run
from headstart.reporting.dashboard import gate_rows


@task(name="gate", cache_policy=NO_CACHE)
def gate(
    config: TrainConfig,
    backbone: Backbone,
    features: FeatureSet,
    probabilities: np.ndarray,
    class_names: tuple[str, ...],
) -> GateDecision:
    """Scores the new model against the champion on the same images and decides whether it takes over."""
    return _announced(promotion.decide(config, backbone, features, probabilities, list(class_names)))


@task(name="gate", cache_policy=NO_CACHE)
def gate_identical_run(
    config: TrainConfig, run_dir: str, backbone: Backbone, features: FeatureSet, class_names: tuple[str, ...]
) -> GateDecision:
    """The gate for an earlier run standing in for this one: scored and judged as a new model, unless it is the champion already."""
    return _announced(promotion.decide_for_identical_run(config, Run(run_dir), backbone, features, list(class_names)))


def _announced(decision: GateDecision) -> GateDecision:
    """The decision, logged and published as the run's gate table."""
    get_run_logger().info("gate: %s", decision.reason)
    create_table_artifact(key="headstart-gate", table=gate_rows(decision), description=decision.reason)
    return decision


@task(name="promote", cache_policy=NO_CACHE)
def promote(config: TrainConfig, run_dir: str, decision: GateDecision) -> None:
    """Makes the new run the champion, as the gate decided."""
    registry.promote(config.artifacts_root, Path(run_dir).name, decision.reason, by="gate")
