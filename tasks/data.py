"""Prefect tasks around headstart.data and headstart.features: download, preprocess, extract, assemble."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from tqdm import tqdm

from headstart.backbone import Backbone, resolve_backbone
from headstart.config import TrainConfig
from headstart.data import DataReport, Manifest, prepare_source
from headstart.errors import HeadstartError
from headstart import features


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
def preprocess(config: TrainConfig, manifest: Manifest) -> tuple[Backbone, list[list[tuple[str, str]]]]:
    """Resolves the backbone and lists, as shards, the images whose features are not cached yet."""
    backbone = resolve_backbone(config.backbone, config.image_size, Path(config.cache_dir))
    return backbone, features.plan_extraction(manifest, backbone, Path(config.cache_dir), config.extraction_shard_size)


@task(name="extract_features", cache_policy=NO_CACHE)
def extract_features(shard: list[tuple[str, str]], backbone: Backbone, cache_dir: Path, settings: features.ExtractionSettings, label: str) -> str:
    """Decodes, resizes and runs the frozen backbone over one shard; returns the engine's name.

    Mapped over shards, so that a Dask task runner spreads the forward passes over its workers.
    """
    with tqdm(total=len(shard), desc=f"extract features {label}", unit="img") as progress:
        return features.extract_shard(shard, backbone, cache_dir, settings, progress)


@task(name="assemble_features", cache_policy=NO_CACHE)
def assemble_features(manifest: Manifest, backbone: Backbone, cache_dir: Path, extracted: int, engines: list[str]) -> features.FeatureSet:
    """Collects the dataset's features from the cache into one Parquet file: the handle training reads."""
    return features.assemble_features(manifest, backbone, cache_dir, extracted, engines[0] if engines else "cache")
