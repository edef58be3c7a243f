"""The `predict` flow: label image files and folders with the champion, a version or a run directory.

A run given no `output` keeps its labels all the same, in a CSV under the artifacts root
(headstart.serving.predict.default_output): a deployment's run has no terminal to print them to.
Inputs with no image to label end the run Failed, in one line (flows/failures.py)."""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from flows.failures import one_line_failures
from flows.parameters import parameters_from
from flows.results import keep_results_in
from headstart.config import PredictConfig, is_url
from headstart.infra.object_store import check_place
from headstart.infra.storage import check_writable_directory
from headstart.serving.predict import check_inputs, default_output, keep_in_store
from tasks.data import warn_skipped
from tasks.prediction import predict as predict_images


@flow(name="predict", log_prints=True, persist_result=True, result_serializer="json")
@parameters_from(PredictConfig)
@one_line_failures
def predict(**parameters) -> str:
    """Labels the inputs; returns a one-line summary naming the file the rows went to (`output`,
    else a new CSV under the artifacts root). The parameters are PredictConfig's fields (see
    headstart.config)."""
    config = PredictConfig(**parameters)
    keep_results_in(config.artifacts_root)
    check_inputs(config.inputs)
    given_no_output = config.output is None
    place = "--output"
    if is_url(config.artifacts_root):  # a local registry is only read: it may be read-only
        check_place(config.artifacts_root, "--artifacts-root")
    if config.output is None:
        name = flow_run.get_name() or "predict"
        config = config.model_copy(update={"output": default_output(config.artifacts_root, name)})
        place = "the predictions folder (or give an output)"
    # A deployment's run has no CLI to check the place before the work.
    check_writable_directory(config.output.parent, place)
    predictions = predict_images(config)
    warn_skipped(predictions.skipped)
    kept = keep_in_store(config.artifacts_root, config.output) if given_no_output else str(config.output.resolve())
    counts = ", ".join(f"{label} {count}" for label, count in predictions.counts().items())
    labelled = f"{len(predictions.paths)} images labelled ({counts}), {len(predictions.skipped)} skipped"
    summary = f"{labelled}; predictions in {kept}"
    print(f"headstart: {summary}")
    return summary
