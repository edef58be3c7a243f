"""Prefect task around headstart.edge: export."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from headstart.data.manifest import Manifest
from headstart.edge import QUANTIZATIONS, ExportImages, export_rows, export_tflite
from headstart.registry.runs import Run
from tasks.reports import table_artifact


@task(name="export", cache_policy=NO_CACHE)
def export(run_dir: str, manifest: Manifest) -> list[dict]:
    """Writes the published run's classifier as .tflite files (float32, then int8) into its
    exports/ folder, each checked against its Keras model on its test split; returns their records
    as the run's metrics.json keeps them."""
    run = Run(Path(run_dir))
    images = ExportImages.from_manifest(manifest.read(), run)
    records = [export_tflite(run, quantize, images) for quantize in QUANTIZATIONS]
    logger = get_run_logger()
    for record in records:
        (logger.info if record.meets_target else logger.warning)("export: %s", record.summary)
    table_artifact(
        "headstart-export",
        export_rows(records),
        "the run as .tflite files, measured against its Keras model",
    )
    # The train flow persists its tasks' results as JSON: these are the records as metrics.json keeps them.
    return [record.to_dict() for record in records]
