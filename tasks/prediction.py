"""Prefect task around headstart.serving.predict: predict, with its per-image table."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from headstart.config import PredictConfig
from headstart.serving.predict import Predictions, predict_as_configured, require_images, write_predictions
from tasks.reports import table_artifact

# Rows of the predictions table in the dashboard; every row is in the output file.
TABLE_ROWS = 500


@task(name="predict", cache_policy=NO_CACHE)
def predict(config: PredictConfig) -> Predictions:
    """Labels the inputs with the chosen model and writes the output file; inputs with no image to
    label fail in one line, before anything is written."""
    predictions, model = predict_as_configured(config)
    require_images(predictions, config.inputs)
    output = Path(write_predictions(predictions, config.output)).resolve()
    rows, left_out = prediction_rows(predictions)
    counts = ", ".join(f"{label} {count}" for label, count in predictions.counts().items())
    if predictions.threshold is not None:
        counts += f"; unsure: top probability below {predictions.threshold:.4f}"
    table_artifact(
        "headstart-predictions",
        rows,
        f"{len(predictions.paths)} images labelled by {model} ({counts}), {len(predictions.skipped)} skipped; "
        f"every row in {output}" + (f"; {left_out} rows left out here" if left_out else ""),
    )
    return predictions


def prediction_rows(predictions: Predictions, limit: int = TABLE_ROWS) -> tuple[list[dict], int]:
    """The table's rows, at most `limit` (path, label, probability; the skipped files after the
    labelled ones, with their reason as the label), and how many were left out."""
    labelled = [
        {"path": row["path"], "label": row["label"], "probability": round(row["probability"], 4)}
        for row in predictions.rows()
    ]
    skipped = [
        {"path": entry["path"], "label": f"(skipped: {entry['reason']})", "probability": None}
        for entry in predictions.skipped
    ]
    rows = labelled + skipped
    return rows[:limit], max(0, len(rows) - limit)
