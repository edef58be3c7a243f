"""Helpers for tests that start from a TrainConfig."""

from headstart.data.sources import prepare_source


def source_of(config, show_progress: bool = False):
    """The manifest and data report of a config's data source, as the download step makes them."""
    return prepare_source(config.data, config.runtime.cache_dir, show_progress)
