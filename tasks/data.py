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
from headstart.errors import HeadstartError
from headstart.features.cache import Shard
from headstart.features.dataset import plan_extraction


def _is_transient(task, task_run, state) -> bool:
    """Retry network hiccups, not a user's mistake: bad data stays bad on the next try."""
    try:
        state.result()
    except HeadstartError:
        return False
    except Exception:
        return True
    return False


# Caching is by content, inside headstart itself (hashes of every image, of the backbone's
# weights): Prefect's input-keyed cache would replay a stale result after the folder changed.
@task(name="download", retries=2, retry_delay_seconds=2, retry_condition_fn=_is_transient, cache_policy=NO_CACHE)
def download(config: TrainConfig) -> tuple[Manifest, DataReport]:
    """Fetches the source (archive or folder) and lists its usable images with their splits."""
    return prepare_source(config, show_progress=True)


@task(name="preprocess", retries=2, retry_delay_seconds=2, retry_condition_fn=_is_transient, cache_policy=NO_CACHE)
def preprocess(config: TrainConfig, manifest: Manifest) -> tuple[Backbone, list[Shard]]:
    """Resolves the backbone (quantized to int8 on training images for the litert-int8 engine) and
    lists, as shards, the images whose features are not cached yet."""
    backbone = resolve_backbone(config.backbone, config.image_size, Path(config.cache_dir))
    if config.engine == INT8_ENGINE:
        backbone = quantized_backbone(
            backbone, representative_rows(manifest.read().to_pylist()), Path(config.cache_dir)
        )
    return backbone, plan_extraction(manifest, backbone, Path(config.cache_dir), config.extraction_shard_size)
