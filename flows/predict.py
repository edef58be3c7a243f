"""The `predict` flow: label image files and folders with the champion, a version or a run directory."""

from __future__ import annotations

from prefect import flow

from flows.parameters import parameters_from
from headstart.config import PredictConfig
from headstart.infra.storage import check_writable_directory
from tasks.prediction import predict as predict_images


@flow(name="predict", log_prints=True, persist_result=True, result_serializer="json")
@parameters_from(PredictConfig)
def predict(**parameters) -> str:
    """Labels the inputs; returns a one-line summary (the rows go to `output`). The parameters are
    PredictConfig's fields (see headstart.config)."""
    config = PredictConfig(**parameters)
    if config.output is not None:  # a deployment's run has no CLI to check it before the work
        check_writable_directory(config.output.parent, "--output")
    predictions = predict_images(config)
    for entry in predictions.skipped:
        print(f"headstart: skipped {entry['path']}: {entry['reason']}")
    counts = ", ".join(f"{label} {count}" for label, count in predictions.counts().items())
    summary = f"{len(predictions.paths)} images labelled ({counts}), {len(predictions.skipped)} skipped"
    print(f"headstart: {summary}" + (f"; predictions in {config.output}" if config.output else ""))
    return summary
