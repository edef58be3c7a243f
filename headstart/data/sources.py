"""A training run's data source, from its configuration: the CIFAR-10 archive or a folder of
labelled images, resolved into a manifest and a data report."""

from __future__ import annotations

from pathlib import Path

from headstart.config import DEFAULT_CIFAR10_CLASSES, DataConfig, as_place, is_url
from headstart.data.cifar10 import extract_cifar10, fetch_cifar10_archive
from headstart.data.folders import list_image_folder
from headstart.data.manifest import DataReport, Manifest, build_manifest
from headstart.data.store_images import check_store_folder, copy_store_folder
from headstart.errors import HeadstartError


def check_source(data: DataConfig) -> None:
    """A data folder that is not there, said in one line before any work; for a store URL
    (a folder of class sub-folders on the store), one that does not answer or holds nothing."""
    if is_url(data.source):
        check_store_folder(as_place(data.source))
    elif data.source != "cifar10" and not Path(data.source).is_dir():
        raise HeadstartError(
            f"data folder not found: {Path(data.source).absolute()} (give a folder of class sub-folders, or 'cifar10')"
        )


def prepare_source(data: DataConfig, cache_dir: Path, show_progress: bool = False) -> tuple[Manifest, DataReport]:
    """Resolves the configured data source into a manifest and a data report."""
    cache_dir = Path(cache_dir)
    if data.source == "cifar10":
        classes = tuple(data.classes or DEFAULT_CIFAR10_CLASSES)
        report = DataReport(source=f"cifar10 ({data.cifar10_source})", class_names=list(classes))
        archive = fetch_cifar10_archive(data.cifar10_source, cache_dir, report)
        files = extract_cifar10(archive, classes, cache_dir)
        class_names, copy_of = list(classes), None
    else:
        report = DataReport(source=str(data.source), class_names=[])
        # A store folder is scanned in this machine's copy of it, its images named by their URLs.
        url = as_place(data.source) if is_url(data.source) else None
        folder = copy_store_folder(url) if url else Path(data.source)
        copy_of = (folder, url) if url else None
        files, class_names = list_image_folder(folder, data.classes, report)
        report.class_names = class_names
    manifest = build_manifest(
        files,
        class_names,
        report,
        cache_dir,
        validation_fraction=data.validation_fraction,
        test_fraction=data.test_fraction,
        max_images_per_class=data.max_images_per_class,
        show_progress=show_progress,
        copy_of=copy_of,
    )
    return manifest, report
