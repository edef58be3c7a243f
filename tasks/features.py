"""Prefect tasks around headstart.features: extract_features (mapped over shards), assemble_features."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from headstart.backbone.handles import Backbone
from headstart.data.manifest import DataReport, Manifest, without_images
from headstart.features.cache import Shard
from headstart.features.dataset import FeatureSet, plan_extraction
from headstart.features.dataset import assemble_features as assemble
from headstart.features.extraction import ExtractedShard, ExtractionContext
from tasks.progress import DashboardProgress


@task(name="plan_extraction", cache_policy=NO_CACHE)
def plan_features(manifest: Manifest, backbone: Backbone, cache_dir: Path, shard_size: int) -> list[Shard]:
    """The images whose features under this backbone are not cached yet, as shards."""
    return plan_extraction(manifest, backbone, cache_dir, shard_size)


@task(name="extract_features", task_run_name="extract_features-{label}", cache_policy=NO_CACHE)
def extract_features(shard: Shard, backbone: Backbone, context: ExtractionContext, label: str) -> ExtractedShard:
    """Decodes, resizes and runs the frozen backbone over one shard, caching the features.

    Mapped over shards, so that a Dask task runner spreads the forward passes over its workers.
    """
    with DashboardProgress(len(shard), f"extract features, shard {label}") as progress:
        return context.extract_shard(shard, backbone, progress)


@task(name="assemble_features", cache_policy=NO_CACHE)
def assemble_features(
    manifest: Manifest,
    report: DataReport,
    backbone: Backbone,
    cache_dir: Path,
    shards: list[ExtractedShard],
) -> tuple[FeatureSet, Manifest, DataReport]:
    """Collects the dataset's features from the cache into one Parquet file, the handle training
    reads; images whose files changed since the scan are left out of the manifest and listed in
    the data report."""
    left_out = [image for shard in shards for image in shard.left_out]
    for _, path, reason in left_out:
        get_run_logger().warning("left out %s: %s", path, reason)
    manifest, report = without_images(manifest, report, left_out, cache_dir)
    features = assemble(
        manifest, backbone, cache_dir, sum(shard.extracted for shard in shards), shards[0].engine if shards else "cache"
    )
    return features, manifest, report
