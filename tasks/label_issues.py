"""Prefect task around headstart.evaluation.label_issues: label_issues, after train_head."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from headstart.config import EvaluationConfig, HeadConfig
from headstart.evaluation.label_issues import LabelIssues, find_training_label_issues
from headstart.features.dataset import FeatureSet


@task(name="label_issues", cache_policy=NO_CACHE)
def label_issues(
    settings: EvaluationConfig, head: HeadConfig, features: FeatureSet, class_names: tuple[str, ...]
) -> LabelIssues:
    """The training images whose label is probably wrong, from out-of-fold heads on the cached
    features (see headstart.evaluation.label_issues)."""
    issues = find_training_label_issues(
        features, class_names, head, settings.label_issue_folds, left_out=settings.drop_label_issues
    )
    summary = issues.summary
    get_run_logger().info(
        "label issues: %d of %d training images flagged as probably mislabelled (out-of-fold accuracy %s, %d folds)%s",
        summary["flagged"],
        summary["train_images"],
        f"{summary['out_of_fold_accuracy']:.4f}" if summary["out_of_fold_accuracy"] is not None else "-",
        summary["folds"],
        "; the head is trained again without them" if summary["left_out"] else "",
    )
    return issues
