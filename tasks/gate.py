"""Prefect tasks around headstart.promotion and the registry's versions: gate, promote."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from headstart.backbone.handles import Backbone
from headstart.config import GateConfig
from headstart.features.dataset import FeatureSet
from headstart.promotion.decide import decide, decide_for_identical_run, promote_as_decided, scorable_champion
from headstart.promotion.mcnemar import GateDecision
from headstart.registry import versions
from headstart.registry.runs import Run
from headstart.reporting.dashboard import gate_rows
from tasks.outcome import publish_champion
from tasks.reports import table_artifact


@task(name="check_champion", cache_policy=NO_CACHE)
def check_champion(artifacts_root: Path) -> None:
    """Stops the run before any work where the gate could not score the champion."""
    scorable_champion(artifacts_root)


@task(name="gate", cache_policy=NO_CACHE)
def gate(
    settings: GateConfig,
    artifacts_root: Path,
    source: str,
    backbone: Backbone,
    features: FeatureSet,
    probabilities: np.ndarray,
    class_names: tuple[str, ...],
) -> GateDecision:
    """Scores the new model (trained on `source`) against the champion on the same images and
    decides whether it takes over."""
    champion = versions.champion(artifacts_root)
    return _announced(decide(settings, champion, source, backbone, features, probabilities, list(class_names)))


@task(name="gate", cache_policy=NO_CACHE)
def gate_identical_run(
    settings: GateConfig,
    artifacts_root: Path,
    source: str,
    run_dir: str,
    backbone: Backbone,
    features: FeatureSet,
    class_names: tuple[str, ...],
) -> GateDecision:
    """The gate for an earlier run standing in for this one: scored and judged as a new model, unless
    it is the champion already."""
    champion = versions.champion(artifacts_root)
    decision = decide_for_identical_run(settings, champion, source, Run(run_dir), backbone, features, list(class_names))
    return _announced(decision)


def _announced(decision: GateDecision) -> GateDecision:
    """The decision, logged and published as the run's gate table."""
    get_run_logger().info("gate: %s", decision.reason)
    table_artifact("headstart-gate", *gate_rows(decision))
    return decision


@task(name="promote", cache_policy=NO_CACHE)
def promote(artifacts_root: Path, run_dir: str, decision: GateDecision, recorded_in_run: bool = True) -> GateDecision:
    """Makes the new run the champion, as the gate decided, if the champion is still the one the
    gate compared it with; otherwise the run stays unpromoted, and the changed decision is logged,
    published as the gate table and (where the run records this gate's decision) written to its
    lineage. A new champion is published as such (the variable headstart_champion, the artifact
    headstart-champion)."""
    final = promote_as_decided(artifacts_root, Path(run_dir).name, decision)
    if final.promote:
        publish_champion(artifacts_root)
    if final != decision:
        get_run_logger().warning("gate: %s", final.reason)
        table_artifact("headstart-gate", *gate_rows(final))
        if recorded_in_run:
            Run(run_dir).record_gate(final.to_dict())
    return final
