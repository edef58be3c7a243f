"""Prefect tasks around headstart.data and the backbone: download, preprocess."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from headstart.backbone.handles import Backbone, resolve_backbone
from headstart.config import INT8_ENGINE, TrainConfig
from headstart.data.manifest import DataReport, Manifest
from headstart.data.sources import prepare_source
from headstart.edge.int8.quantization import quantized_backbone, representative_rows
from headstart.features.cache import Shard
from headstart.features.dataset import plan_extraction


# Caching is by content, inside headstart itself (hashes of every image, of the backbone's
# weights): Prefect's input-keyed cache would replay a stale result after the folder changed.
# Retrying is the downloader's alone (headstart.infra.downloads): it knows which failures a later
# attempt can fix. Retries here as well would multiply its attempts, or rerun a bug; 0, not
# Prefect's default, so that a default set for every task does not add them back.
@task(name="download", retries=0, cache_policy=NO_CACHE)
def download(config: TrainConfig) -> tuple[Manifest, DataReport]:
    """Fetches the source (archive or folder) and lists its usable images with their splits."""
    return prepare_source(config, show_progress=True)


@task(name="preprocess", retries=0, cache_policy=NO_CACHE)
def preprocess(config: TrainConfig, manifest: Manifest) -> tuple[Backbone, list[Shard]]:
    """Resolves the backbone (quantized to int8 on training images for the litert-int8 engine) and
    lists, as shards, the images whose features are not cached yet."""
    backbone = resolve_backbone(config.backbone, config.image_size, Path(config.cache_dir))
    if config.engine == INT8_ENGINE:
        backbone = quantized_backbone(
            backbone, representative_rows(manifest.read().to_pylist()), Path(config.cache_dir)
        )
    return backbone, plan_extraction(manifest, backbone, Path(config.cache_dir), config.extraction_shard_size)
