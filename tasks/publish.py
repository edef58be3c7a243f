"""Prefect tasks that write run directories and publish them as Prefect artifacts."""

from __future__ import annotations

import socket
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from prefect.runtime import flow_run

from headstart.backbone.handles import Backbone
from headstart.config import RuntimeConfig, TrainConfig
from headstart.data.manifest import DataReport
from headstart.evaluation.label_issues import LabelIssues
from headstart.features.dataset import FeatureSet
from headstart.promotion.mcnemar import GateDecision
from headstart.registry.reuse import in_registry, record_run
from headstart.registry.run_writer import copy_run, write_run
from headstart.registry.runs import Run
from headstart.reporting.dashboard import report_markdown, run_tables
from headstart.reporting.label_issues import label_issues_markdown
from headstart.reporting.outcome import report_headline
from headstart.training.fine_tuning import FineTuningResult
from tasks.reports import markdown_artifact, table_artifact


@task(name="publish", cache_policy=NO_CACHE)
def publish(
    config: TrainConfig,
    training_key: str,
    classifier,
    backbone: Backbone,
    features: FeatureSet,
    report: DataReport,
    history: dict,
    metrics: dict,
    figures: dict[str, bytes],
    decision: GateDecision | None = None,
    near_duplicates: dict | None = None,
    fine_tuning: FineTuningResult | None = None,
    sweep: list[dict] | None = None,
    label_issues: LabelIssues | None = None,
) -> str:
    """Writes the run directory atomically and publishes its report to Prefect."""
    run_dir = write_run(
        config.runtime.artifacts_root,
        config=config,
        training_key=training_key,
        classifier=classifier,
        backbone=backbone,
        features=features,
        data_report=report.to_dict(),
        history=history,
        metrics=metrics,
        figures=figures,
        flow_run_id=flow_run.id,
        gate=decision.to_dict() if decision is not None else None,
        near_duplicates=near_duplicates,
        fine_tuning=fine_tuning,
        sweep=sweep,
        label_issues=label_issues,
    )
    record_run(config.runtime.cache_dir, training_key, run_dir)
    return publish_prefect_artifacts(Run(run_dir), report_headline(Path(run_dir).name, decision))


@task(name="reuse_identical_run", cache_policy=NO_CACHE)
def reuse_identical_run(runtime: RuntimeConfig, training_key: str, previous: Path) -> str:
    """An earlier run whose inputs were all identical stands for this one (training would reproduce
    it exactly): the version itself where it is in this run's registry, else a copy of it there."""
    if in_registry(runtime.artifacts_root, previous):
        get_run_logger().info(
            "Every input matches version %s; it stands for this run, nothing is trained (--no-reuse to retrain)",
            Path(previous).name,
        )
        return publish_prefect_artifacts(Run(previous))
    get_run_logger().info(
        "Every input matches run %s; copying it instead of retraining (--no-reuse to retrain)", previous
    )
    copied = copy_run(runtime.artifacts_root, previous, flow_run.id)
    record_run(runtime.cache_dir, training_key, copied)
    return publish_prefect_artifacts(Run(copied))


def publish_prefect_artifacts(run: Run, headline: str = "") -> str:
    """The report (plots embedded; `headline` first) and the run's tables (metrics, data,
    near-duplicates, label issues with thumbnails) as Prefect artifacts; returns the run directory."""
    markdown_artifact(
        key="headstart-report",
        markdown=report_markdown(run, socket.gethostname(), flow_run.ui_url, headline),
        description=f"Training report, test accuracy {run.metrics['accuracy']:.4f}",
    )
    for key, rows, description in run_tables(run):
        table_artifact(key, rows, description)
    label_issues = label_issues_markdown(run)
    if label_issues is not None:
        markdown_artifact("headstart-label-issues", *label_issues)
    return str(run.path)
