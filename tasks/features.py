"""Prefect tasks around headstart.features: extract_features (mapped over shards), assemble_features."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from headstart.backbone.handles import Backbone
from headstart.data.manifest import Manifest
from headstart.features.cache import Shard
from headstart.features.dataset import FeatureSet, assemble_features as assemble
from headstart.features.extraction import ExtractionContext
from tasks.progress import DashboardProgress


@task(name="extract_features", task_run_name="extract_features-{label}", cache_policy=NO_CACHE)
def extract_features(shard: Shard, backbone: Backbone, context: ExtractionContext, label: str) -> str:
    """Decodes, resizes and runs the frozen backbone over one shard; returns the engine's name.

    Mapped over shards, so that a Dask task runner spreads the forward passes over its workers.
    """
    with DashboardProgress(len(shard), f"extract features, shard {label}") as progress:
        return context.extract_shard(shard, backbone, progress)


@task(name="assemble_features", cache_policy=NO_CACHE)
def assemble_features(manifest: Manifest, backbone: Backbone, cache_dir: Path, extracted: int, engines: list[str]) -> FeatureSet:
    """Collects the dataset's features from the cache into one Parquet file: the handle training reads."""
    return assemble(manifest, backbone, cache_dir, extracted, engines[0] if engines else "cache")
