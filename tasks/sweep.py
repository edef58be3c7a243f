"""Prefect tasks around headstart.training.sweep: try_head_setting (one per setting of the grid,
mapped, so that a Dask task runner spreads them) and choose_head_setting, with its table."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from headstart.config import HeadConfig
from headstart.features.dataset import FeatureSet
from headstart.training.sweep import HeadSetting, TriedSetting, best_setting, try_setting
from tasks.reports import table_artifact


@task(name="try_head_setting", cache_policy=NO_CACHE, task_run_name="try_head_setting {label}")
def try_head_setting(
    setting: HeadSetting, head: HeadConfig, features: FeatureSet, num_classes: int, label: str
) -> TriedSetting:
    """One setting of the sweep trained on the cached features and scored on the validation split."""
    return try_setting(setting, head, features, num_classes)


@task(name="choose_head_setting", cache_policy=NO_CACHE)
def choose_head_setting(tried: list[TriedSetting]) -> tuple[HeadSetting, list[dict]]:
    """The best setting on validation, and every setting's row (the `headstart-sweep` table), best first."""
    best = best_setting(tried)
    ranked = sorted(tried, key=lambda t: (-t.validation_score, t.validation_loss))
    rows = [{**t.row(), "chosen": t is best} for t in ranked]
    table_artifact(
        "headstart-sweep",
        rows,
        f"{len(tried)} head settings tried on the cached features; chosen on the validation split: "
        f"{best.setting.label} ({best.validation_score:.4f})",
    )
    return best.setting, rows
