"""Prefect tasks around headstart.data and the backbone: download, prepare_backbone; and the
skipped files said in the run's log."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from headstart.backbone.handles import Backbone, publish_backbone, resolve_backbone
from headstart.config import INT8_ENGINE, BackboneConfig, DataConfig, Place, is_url
from headstart.data.manifest import DataReport, Manifest, skipped_summary
from headstart.data.sources import prepare_source
from headstart.edge import quantized_backbone, representative_rows
from headstart.infra.object_store import local_copy


# Caching is by content, inside headstart itself (hashes of every image, of the backbone's
# weights): Prefect's input-keyed cache would replay a stale result after the folder changed.
# Retrying is the downloader's alone (headstart.infra.downloads): it knows which failures a later
# attempt can fix. Retries here as well would multiply its attempts, or rerun a bug; 0, not
# Prefect's default, so that a default set for every task does not add them back.
@task(name="download", retries=0, cache_policy=NO_CACHE)
def download(data: DataConfig, cache_dir: Path) -> tuple[Manifest, DataReport]:
    """Fetches the source (archive or folder) and lists its usable images with their splits."""
    return prepare_source(data, cache_dir, show_progress=True)


@task(name="prepare_backbone", retries=0, cache_policy=NO_CACHE)
def prepare_backbone(settings: BackboneConfig, manifest: Manifest, cache: Place) -> Backbone:
    """Resolves the backbone (downloaded or converted once, then cached), quantized to int8 on the
    training images for the litert-int8 engine; with a store cache, also published there by its
    fingerprint, for the extraction workers that have no copy of it."""
    cache_dir = local_copy(cache)
    backbone = resolve_backbone(settings.handle, settings.image_size, cache_dir)
    if settings.engine == INT8_ENGINE:
        backbone = quantized_backbone(backbone, representative_rows(manifest.read().to_pylist()), cache_dir)
    if is_url(cache):
        publish_backbone(backbone, cache)
    return backbone


def warn_skipped(skipped: list[dict[str, str]]) -> None:
    """Files left out of a run, in one WARNING of the run's log (the level the dashboard shows by
    default): the count and the first few; every one is in the data report or the predictions."""
    summary = skipped_summary(skipped)
    if summary is not None:
        get_run_logger().warning(summary)
