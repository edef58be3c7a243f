"""A training run's data source, from its configuration: the CIFAR-10 archive or a folder of
labelled images, resolved into a manifest and a data report."""

from __future__ import annotations

from pathlib import Path

from headstart.data.cifar10 import extract_cifar10, fetch_cifar10_archive
from headstart.data.folders import list_image_folder
from headstart.data.manifest import DataReport, Manifest, build_manifest


def prepare_source(config, show_progress: bool = False) -> tuple[Manifest, DataReport]:
    """Resolves the configured data source into a manifest and a data report."""
    cache_dir = Path(config.cache_dir)
    if config.data == "cifar10":
        classes = tuple(config.classes or ("cat", "dog"))
        report = DataReport(source=f"cifar10 ({config.cifar10_source})", class_names=list(classes))
        archive = fetch_cifar10_archive(config.cifar10_source, cache_dir, report)
        files = extract_cifar10(archive, classes, cache_dir)
        class_names = list(classes)
    else:
        report = DataReport(source=str(config.data), class_names=[])
        files, class_names = list_image_folder(Path(config.data), config.classes, report)
        report.class_names = class_names
    manifest = build_manifest(
        files,
        class_names,
        report,
        cache_dir,
        validation_fraction=config.validation_fraction,
        test_fraction=config.test_fraction,
        max_images_per_class=config.max_images_per_class,
        show_progress=show_progress,
    )
    return manifest, report
