"""Prefect task around headstart.serving.predict: predict, with its summary table."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from headstart.config import PredictConfig
from headstart.serving.predict import Predictions, predict_as_configured, write_predictions
from tasks.reports import table_artifact


@task(name="predict", cache_policy=NO_CACHE)
def predict(config: PredictConfig) -> Predictions:
    """Labels the inputs with the chosen model; writes the output file where one is asked for."""
    predictions, model = predict_as_configured(config)
    output = write_predictions(predictions, config.output) if config.output else None
    rows = [{"label": label, "images": count} for label, count in predictions.counts().items()] + [
        {"label": "(unreadable, skipped)", "images": len(predictions.skipped)}
    ]
    table_artifact(
        "headstart-predictions",
        rows,
        f"{len(predictions.paths)} images labelled by {model}"
        + (f"; written to {Path(output).resolve()}" if output else ""),
    )
    return predictions
