"""Helpers for tests that start from a TrainConfig."""

from headstart.data.sources import prepare_source


def source_of(config, show_progress: bool = False):
    """The manifest and data report of a config's data source, as the download step makes them."""
    return prepare_source(config.data, config.runtime.cache_dir, show_progress)


def smoke_config(data, backbone, root, **overrides):
    """A tiny TrainConfig on `data` and `backbone`, its artifacts and cache under `root`."""
    from pathlib import Path

    from headstart.config import TrainConfig

    root = Path(root)
    return TrainConfig.smoke(
        data=str(data), backbone=str(backbone), artifacts_root=root / "artifacts", cache_dir=root / "cache", **overrides
    )
