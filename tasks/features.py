"""Prefect tasks around headstart.features: extract_features (mapped over shards), assemble_features."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from headstart.backbone.handles import Backbone, publish_backbone
from headstart.config import Place, is_url
from headstart.data.manifest import DataReport, Manifest, without_images
from headstart.features.cache import Shard
from headstart.features.dataset import FeatureSet, plan_extraction
from headstart.features.dataset import assemble_features as assemble
from headstart.features.extraction import ExtractedShard, ExtractionContext
from headstart.infra.object_store import local_copy
from tasks.progress import DashboardProgress


@task(name="plan_extraction", cache_policy=NO_CACHE)
def plan_features(manifest: Manifest, backbone: Backbone, cache: Place, shard_size: int) -> list[Shard]:
    """The images whose features under this backbone are not cached yet (in the cache folder, or
    on the store cache), as shards. With a store cache and shards to extract, the backbone (a
    fine-tuned one too) is published there first, for workers that have no copy of it."""
    shards = plan_extraction(manifest, backbone, cache, shard_size)
    if shards and is_url(cache):
        publish_backbone(backbone, cache)
    return shards


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
    cache: Place,
    shards: list[ExtractedShard],
) -> tuple[FeatureSet, Manifest, DataReport]:
    """Collects the dataset's features from the cache into one Parquet file, the handle training
    reads; images whose files changed since the scan are left out of the manifest and listed in
    the data report."""
    left_out = [image for shard in shards for image in shard.left_out]
    for _, path, reason in left_out:
        get_run_logger().warning("left out %s: %s", path, reason)
    manifest, report = without_images(manifest, report, left_out, local_copy(cache))
    features = assemble(
        manifest, backbone, cache, sum(shard.extracted for shard in shards), shards[0].engine if shards else "cache"
    )
    return features, manifest, report
