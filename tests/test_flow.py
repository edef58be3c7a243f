"""The train flow under a Prefect test harness, and the command line around it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_class_images

from headstart.config import TrainConfig
from headstart.promotion.mcnemar import GateDecision
from headstart.registry.runs import RUN_FILES, Run

PROJECT = Path(__file__).resolve().parents[1]


def _smoke_config(folder, backbone_dir, tmp_path, **overrides):
    # Few images: a high learning rate and patience let 29 training images converge in 40 epochs.
    values = dict(epochs=40, learning_rate=0.1, batch_size=8, patience=40, test_fraction=0.25)
    values.update(overrides)
    return TrainConfig.smoke(
        data=str(folder),
        backbone=str(backbone_dir),
        artifacts_root=tmp_path / "artifacts",
        cache_dir=tmp_path / "cache",
        **values,
    )


def test_train_flow_writes_a_complete_run(prefect_harness, colour_folder, tiny_backbone_dir, tmp_path):
    from prefect.artifacts import Artifact

    from flows.train import train
    from headstart.reporting.attention_plots import ATTENTION_PLOTS
    from headstart.reporting.plots import PLOT_FILES

    # A threshold no two different images reach: the tiny backbone's 16 features make every
    # image of a class alike (tests/test_leakage.py checks the near-duplicates with another).
    run_dir = Path(
        train(**_smoke_config(colour_folder, tiny_backbone_dir, tmp_path, near_duplicate_threshold=1.0).flat())
    )
    assert run_dir.parent == (tmp_path / "artifacts").resolve()
    assert {p.name for p in run_dir.iterdir()} == set(RUN_FILES)
    run = Run.if_complete(run_dir)
    assert [png.name for png in run.plots()] == sorted(PLOT_FILES + ATTENTION_PLOTS)
    assert run.data_report["near_duplicates"]["splits"]["test"]["flagged"] == 0
    assert "No test image has a near-duplicate in the training split" in run.model_card
    assert all(png.read_bytes().startswith(b"\x89PNG") for png in run.plots())
    assert run.metrics["accuracy"] >= 0.9 and run.metrics["n"] > 0
    assert run.class_names == ["blue", "red"]
    assert not list((tmp_path / "artifacts").glob(".*"))  # no staging leftovers
    lineage = run.lineage
    assert lineage.version == run_dir.name and lineage.flow_run_id and lineage.class_names == ["blue", "red"]
    assert (
        sum(split.images for split in lineage.data.splits.values())
        == 48
        == run.metrics["n"] + sum(lineage.data.splits[split].images for split in ("train", "validation"))
    )
    assert lineage.backbone.fingerprint == run.config["backbone_fingerprint"] and lineage.parameters["epochs"] == 40

    report = Artifact.get("headstart-report")
    assert report is not None and report.data.count("data:image/png;base64,") == len(PLOT_FILES + ATTENTION_PLOTS)
    table = Artifact.get("headstart-metrics")
    assert table is not None and "blue" in table.data
    assert "no near-duplicates at or above 1.0" in Artifact.get("headstart-near-duplicates").data
    data = Artifact.get("headstart-data")
    assert (
        data is not None
        and "every file was used" in data.data
        and data.description.startswith("48 images used, 0 files skipped")
    )


def test_the_flow_extracts_every_shard_within_one_extraction_context(
    prefect_harness, colour_folder, tiny_backbone_dir, tmp_path
):
    import logging

    from flows.train import train

    messages = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("headstart.features.extraction")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        train(
            **_smoke_config(colour_folder, tiny_backbone_dir, tmp_path, engine="keras", extraction_shard_size=10).flat()
        )
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert len(list((tmp_path / "cache" / "features").rglob("shard-*.parquet"))) == 5
    # One engine, built for the first shard and kept for the other four.
    assert [message for message in messages if message.startswith("feature extraction engine")] == [
        "feature extraction engine: keras (requested)"
    ]


def _with_swapped_training_labels(
    folder: Path, destination: Path, validation_fraction: float, test_fraction: float
) -> Path:
    """The folder's images with their test split under the right class and every other image under the other one."""
    import hashlib

    from headstart.data.manifest import assign_split

    other = {"blue": "red", "red": "blue"}
    for path in sorted(folder.glob("*/*.png")):
        data = path.read_bytes()
        split = assign_split(hashlib.sha256(data).hexdigest(), validation_fraction, test_fraction)
        label = path.parent.name if split == "test" else other[path.parent.name]
        (destination / label).mkdir(parents=True, exist_ok=True)
        (destination / label / f"{path.parent.name}-{path.name}").write_bytes(data)
    return destination


def test_the_gate_promotes_the_first_model_and_keeps_it_against_a_worse_one(
    prefect_harness, colour_folder, tiny_backbone_dir, tmp_path
):
    from prefect.artifacts import Artifact

    from flows.train import train
    from headstart.registry import versions as registry

    config = _smoke_config(colour_folder, tiny_backbone_dir, tmp_path)
    first = Path(train(**config.flat()))
    assert registry.champion_version(tmp_path / "artifacts") == first.name
    first_decision = GateDecision.from_dict(Run(first).lineage.gate)
    assert first_decision.promote and first_decision.reason.startswith("first model promoted")

    worse = _with_swapped_training_labels(
        colour_folder, tmp_path / "worse", config.data.validation_fraction, config.data.test_fraction
    )
    second = Path(train(**config.with_options(**{"data": str(worse)}).flat()))
    assert registry.champion_version(tmp_path / "artifacts") == first.name
    decision = GateDecision.from_dict(Run(second).lineage.gate)
    assert not decision.promote and decision.champion == first.name
    assert decision.images == Run(second).metrics["n"] and decision.candidate_accuracy < decision.champion_accuracy
    assert decision.candidate_only_wrong > decision.candidate_only_right
    table = Artifact.get("headstart-gate")
    assert "keep the champion" in table.data and first.name in table.data
    assert [entry["by"] for entry in registry.history(tmp_path / "artifacts")] == ["gate"]


def test_the_drift_note_counts_new_images_and_how_far_their_mean_feature_moved(
    prefect_harness, colour_folder, tiny_backbone_dir, tmp_path
):
    import shutil

    from conftest import write_class_images
    from prefect.artifacts import Artifact

    from flows.train import train

    config = _smoke_config(colour_folder, tiny_backbone_dir, tmp_path)
    train(**config.flat())
    grown = tmp_path / "grown"
    shutil.copytree(colour_folder, grown)
    write_class_images(tmp_path / "new", {"red": (250, 140, 140)}, per_class=12, seed=5)
    for image in (tmp_path / "new" / "red").iterdir():
        shutil.copy(image, grown / "red" / f"new-{image.name}")
    drift = GateDecision.from_dict(Run(train(**config.with_options(**{"data": str(grown)}).flat())).lineage.gate).drift
    assert (drift["new_images"], drift["images_gone"], drift["images"], drift["champion_images"]) == (12, 0, 60, 48)
    assert drift["per_class"] == {
        "blue": {"images": 24, "champion_images": 24},
        "red": {"images": 36, "champion_images": 24},
    }
    # Pale red images lie far from the champion's training mean; the whole set moves less, but more than chance.
    assert drift["new_images_mean_feature_shift"] > 3 * drift["new_images_shift_by_chance"]
    assert drift["new_images_mean_feature_shift"] > drift["mean_feature_shift"] > drift["mean_feature_shift_by_chance"]
    gate = Artifact.get("headstart-gate")
    assert "12 new images, 0 gone since champion" in gate.description
    assert '"drift: new_images", "value": 12' in gate.data


def test_a_champion_scores_the_same_from_cached_features_as_from_raw_images(
    prefect_harness, colour_folder, tiny_backbone_dir, tmp_path
):
    import dataclasses

    import numpy as np

    from flows.train import train
    from headstart.backbone.handles import resolve_backbone
    from headstart.features.dataset import FeatureSet
    from headstart.serving.inference import run_probabilities

    config = _smoke_config(colour_folder, tiny_backbone_dir, tmp_path)
    champion = Run(train(**config.flat()))
    (dataset,) = (tmp_path / "cache" / "datasets").glob("*.parquet")
    features = FeatureSet(dataset, 0, 0, "")
    backbone = resolve_backbone(config.backbone.handle, config.backbone.image_size, config.runtime.cache_dir)
    test = features.rows("test", ["path", "sha256"])
    fair = np.ones(len(test["path"]), bool)
    from_features, scored = run_probabilities(champion, backbone, features, fair, test["path"], test["sha256"])
    other_backbone = dataclasses.replace(backbone, fingerprint="another backbone")
    from_images, scored_from_images = run_probabilities(
        champion, other_backbone, features, fair, test["path"], test["sha256"]
    )
    assert from_features.shape == (len(fair), 2) and scored.all() and scored_from_images.all()
    np.testing.assert_allclose(from_features, from_images, atol=1e-4)
    # A test image rewritten since the scan is left out of the champion's scores, never scored on its new pixels.
    Path(test["path"][0]).write_bytes(Path(test["path"][1]).read_bytes())
    rescored, rescored_which = run_probabilities(champion, other_backbone, features, fair, test["path"], test["sha256"])
    assert list(rescored_which) == [False] + [True] * (len(fair) - 1)
    np.testing.assert_allclose(rescored, from_images[1:], atol=1e-4)


def test_predictions_through_the_fast_engine_equal_the_serving_models(
    prefect_harness, colour_folder, tiny_backbone_dir, tmp_path
):
    import numpy as np
    import pyarrow.parquet as pq
    from prefect.artifacts import Artifact

    from flows.predict import predict
    from flows.train import train
    from headstart.data.images import load_image

    run = Run(train(**_smoke_config(colour_folder, tiny_backbone_dir, tmp_path).flat()))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG truncated")
    output = tmp_path / "out" / "predictions.parquet"
    summary = predict(
        inputs=[str(colour_folder), str(tmp_path / "broken.png")],
        output=output,
        artifacts_root=tmp_path / "artifacts",
        cache_dir=tmp_path / "cache",
        engine="litert",
    )
    assert summary.startswith("48 images labelled") and summary.endswith(f"1 skipped; predictions in {output}")
    table = pq.read_table(output).to_pydict()
    paths = sorted(str(path) for path in colour_folder.glob("*/*.png"))
    assert sorted(table["path"]) == paths
    order = np.argsort(table["path"])
    serving = run.serving_model()(np.stack([load_image(path) for path in paths]).astype(np.float32))
    np.testing.assert_allclose(np.array(table["probability"])[order], serving.max(axis=1), atol=1e-4)
    assert [table["label"][i] for i in order] == [run.class_names[i] for i in serving.argmax(axis=1)]
    artifact = Artifact.get("headstart-predictions")
    table = {row["path"]: row for row in json.loads(artifact.data)}
    assert table[str(tmp_path / "broken.png")]["label"].startswith("(skipped: cannot decode")
    assert sorted(table) == sorted(paths + [str(tmp_path / "broken.png")]) and str(output) in artifact.description
    # Given no output, the labels are kept all the same: a deployment's run has no terminal to print them to.
    places = dict(artifacts_root=tmp_path / "artifacts", cache_dir=tmp_path / "cache")
    summary = predict(inputs=[str(colour_folder / "red")], **places)
    (kept,) = (tmp_path / "artifacts" / "predictions").iterdir()
    assert summary.endswith(f"predictions in {kept}") and kept.suffix == ".csv"
    assert len(kept.read_text().splitlines()) == 25  # a header and the 24 red images


def test_rerun_with_identical_inputs_reuses_or_retrains_to_identical_metrics(
    prefect_harness, colour_folder, tiny_backbone_dir, tmp_path
):
    from prefect.artifacts import Artifact

    from flows.train import train
    from headstart.registry import versions as registry

    root = tmp_path / "artifacts"
    config = _smoke_config(colour_folder, tiny_backbone_dir, tmp_path, gate=False)
    first = Path(train(**config.flat()))
    # Repeated with the gate on: the same version stands for the run, and meets the gate it never met.
    gated = config.with_options(**{"gate": True})
    assert Path(train(**gated.flat())) == first
    assert [version.version for version in registry.versions(root)] == [first.name]
    assert registry.champion_version(root) == first.name and registry.history(root)[-1]["by"] == "gate"
    assert f"accuracy {Run(first).metrics['accuracy']:.4f}" in Artifact.get("headstart-gate").description
    # Once more: nothing to train and nothing to change.
    assert Path(train(**gated.flat())) == first
    assert len(registry.history(root)) == 1 and "is the champion already" in Artifact.get("headstart-gate").description
    assert "reused_from" not in Run(first).config and len(registry.versions(root)) == 1

    # Under another artifacts root the earlier run is copied, as a version of that registry.
    elsewhere = Path(train(**config.with_options(**{"artifacts_root": tmp_path / "elsewhere"}).flat()))
    assert (
        Path(train(**config.with_options(**{"artifacts_root": tmp_path / "elsewhere"}).flat())) == elsewhere
    )  # copied once
    retrained = Path(train(**config.with_options(**{"reuse_identical_runs": False}).flat()))
    assert elsewhere.parent == tmp_path / "elsewhere" and len({first, elsewhere, retrained}) == 3
    assert json.loads((elsewhere / "config.json").read_text())["reused_from"] == str(first)
    first_lineage, copied_lineage = Run(first).lineage, Run(elsewhere).lineage
    assert copied_lineage.version == elsewhere.name and copied_lineage.reused_from == str(first)
    assert copied_lineage.flow_run_id != first_lineage.flow_run_id and copied_lineage.data == first_lineage.data
    assert first_lineage.reused_from is None  # the copy did not write through its link
    assert "reused_from" not in json.loads((retrained / "config.json").read_text())
    metrics = [json.loads((run / "metrics.json").read_text()) for run in (first, elsewhere, retrained)]
    assert metrics[0] == metrics[1]
    assert {k: v for k, v in metrics[0].items() if not k.startswith(("features_", "engine"))} == {
        k: v for k, v in metrics[2].items() if not k.startswith(("features_", "engine"))
    }
    assert json.loads((first / "history.json").read_text()) == json.loads((retrained / "history.json").read_text())
    assert "reused_from" not in json.loads(
        (first / "config.json").read_text()
    )  # the copy did not write through its link


def test_saved_models_reproduce_the_training_predictions(prefect_harness, colour_folder, tiny_backbone_dir, tmp_path):
    import numpy as np

    from flows.train import train
    from headstart.data.images import load_image

    run = Run(train(**_smoke_config(colour_folder, tiny_backbone_dir, tmp_path).flat()))
    images = np.stack([load_image(p) for p in sorted((colour_folder / "red").glob("*.png"))[:4]]).astype(np.float32)
    predict = run.serving_model()
    np.testing.assert_allclose(predict(images), run.keras_model().predict(images, verbose=0), atol=1e-5)
    assert [run.class_names[i] for i in predict(images).argmax(1)] == ["red"] * 4


def test_a_failed_run_leaves_no_run_directory(prefect_harness, colour_folder, tiny_backbone_dir, tmp_path, monkeypatch):
    from flows.train import train
    from headstart.registry import run_writer

    def crash(self, classifier, backbone):
        raise OSError("disk full")

    monkeypatch.setattr(run_writer.RunWriter, "save_classifier", crash)
    with pytest.raises(OSError, match="disk full"):
        train(**_smoke_config(colour_folder, tiny_backbone_dir, tmp_path).flat())
    assert not (tmp_path / "artifacts").exists() or not any((tmp_path / "artifacts").iterdir())


# --- failures in one line -------------------------------------------------------------------------


def _run_logs(flow_run_id) -> str:
    """The run's log as the dashboard shows it: every message the API holds for it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(f"{log.level} {log.message}" for log in logs)


def test_an_expected_failure_ends_the_flow_run_failed_with_its_one_line_and_no_traceback(prefect_harness, tmp_path):
    from flows.predict import predict
    from flows.train import train
    from headstart.errors import HeadstartError

    one_class = write_class_images(tmp_path / "data", {"red": (200, 40, 40)}, per_class=3)
    places = dict(cache_dir=tmp_path / "cache", artifacts_root=tmp_path / "artifacts")
    state = train(data=str(one_class), **places, return_state=True)
    line = f"{one_class} needs at least two class sub-folders of images, found 1"
    assert state.is_failed() and state.message == line
    logs = _run_logs(state.state_details.flow_run_id)
    assert f"40 {line}" in logs and "Traceback" not in logs and "exited with unexpected exception" not in logs
    with pytest.raises(HeadstartError, match="needs at least two class"):  # the command gets the error back
        train(data=str(one_class), **places)
    state = predict(inputs=[str(tmp_path / "nope")], **places, return_state=True)
    assert state.is_failed() and state.message.startswith(f"no image to label: {tmp_path / 'nope'} not found")
    assert "Traceback" not in _run_logs(state.state_details.flow_run_id)
    state = train(data=str(one_class), classes=["red"], **places, return_state=True)
    assert state.is_failed() and state.message == "classes: at least two classes are needed"


def test_a_bug_in_a_flow_run_keeps_its_traceback(prefect_harness):
    from prefect import flow

    from flows.failures import one_line_failures

    @flow(name="buggy")
    @one_line_failures
    def buggy():
        return 1 / 0

    state = buggy(return_state=True)
    assert state.is_failed() and "ZeroDivisionError" in state.message
    assert "Traceback" in _run_logs(state.state_details.flow_run_id)


def test_prefect_s_reports_of_an_expected_failure_are_left_out_and_a_bug_s_kept():
    import errno
    import logging

    import httpx

    from flows.failures import NoTracebackForExpectedFailures
    from headstart.errors import HeadstartError

    def record(logger: str, error: BaseException):
        try:
            raise error
        except BaseException:
            exc_info = sys.exc_info()
        return logging.LogRecord(logger, logging.ERROR, __file__, 1, "Task run failed\nmore", (), exc_info)

    keep = NoTracebackForExpectedFailures().filter
    assert not keep(record("prefect.task_runs", HeadstartError("data folder not found: /x")))
    assert not keep(record("prefect.engine", OSError(errno.ENOSPC, "No space left on device", "/artifacts")))
    for said_in_one_line in (record("headstart.x", HeadstartError("bad")), record("prefect", httpx.ConnectError("no"))):
        assert keep(said_in_one_line) and said_in_one_line.exc_info is None
        assert said_in_one_line.getMessage() == "Task run failed"
    bug = record("prefect.flow_runs", ZeroDivisionError("division by zero"))
    assert keep(bug) and bug.exc_info[0] is ZeroDivisionError


def test_a_rejected_parameter_is_named_as_the_flow_and_as_the_command_spell_it():
    from pydantic import ValidationError

    from flows.failures import expected_failure

    with pytest.raises(ValidationError) as rejected:
        TrainConfig(data="x", classes=("cat",))
    assert expected_failure(rejected.value) == "classes: at least two classes are needed"
    assert expected_failure(rejected.value, flags=True) == "--classes: at least two classes are needed"
    assert expected_failure(ZeroDivisionError("division by zero")) is None


# --- the command line -------------------------------------------------------------------------------


def _headstart(*args, tmp_path, check=True):
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], cwd=PROJECT, env=env, capture_output=True, text=True, timeout=600
    )
    if check and result.returncode != 0:
        raise AssertionError(result.stderr[-3000:])
    return result


def test_cli_train_evaluate_predict(colour_folder, tiny_backbone_dir, tmp_path):
    trained = _headstart(
        "train",
        "--data",
        str(colour_folder),
        "--backbone",
        str(tiny_backbone_dir),
        "--image-size",
        "32",
        "--epochs",
        "40",
        "--learning-rate",
        "0.1",
        "--batch-size",
        "8",
        "--artifacts-root",
        str(tmp_path / "artifacts"),
        "--cache-dir",
        str(tmp_path / "cache"),
        tmp_path=tmp_path,
    )
    run_dir = trained.stdout.strip().splitlines()[-1]
    assert Path(run_dir, "metrics.json").is_file()

    evaluated = _headstart("evaluate", "--model", run_dir, "--data", str(colour_folder), "--json", tmp_path=tmp_path)
    result = json.loads(evaluated.stdout)
    assert result["n"] == 48 and result["accuracy"] >= 0.9

    red = sorted((colour_folder / "red").glob("*.png"))[0]
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    predicted = _headstart(
        "predict",
        "--model",
        run_dir,
        str(red),
        str(tmp_path / "bad.jpg"),
        "--cache-dir",
        str(tmp_path / "cache"),
        tmp_path=tmp_path,
    )
    path, label, probability = predicted.stdout.strip().split("\t")
    assert path == str(red) and label == "red" and 0.5 < float(probability) <= 1.0
    assert "bad.jpg" in predicted.stderr and "Traceback" not in predicted.stderr

    # The champion (the gate promoted this first run), over a folder, into a CSV file.
    (colour_folder / "blue" / "notes.txt").write_text("not an image")
    output = tmp_path / "predictions.csv"
    labelled = _headstart(
        "predict",
        str(colour_folder),
        "--output",
        str(output),
        "--artifacts-root",
        str(tmp_path / "artifacts"),
        "--cache-dir",
        str(tmp_path / "cache"),
        tmp_path=tmp_path,
    )
    assert "48 predictions written" in labelled.stderr and "notes.txt: not an image file" in labelled.stderr
    import csv

    with open(output) as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 48 and sum(row["label"] == Path(row["path"]).parent.name for row in rows) >= 44


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--data", "/no/such/folder"], "data folder not found"),
        (["train", "--data", "x", "--image-size", "7"], "--image-size"),
        (["train", "--data", "x", "--dropout", "1.5"], "--dropout"),
        (["train", "--data", "x", "--classes", "cat"], "at least two classes"),
        (["evaluate", "--model", "/no/such/run", "--data", "/tmp"], "not a headstart run directory"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_code_2(args, message, tmp_path):
    result = _headstart(*args, tmp_path=tmp_path, check=False)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("headstart: error")]) == 1


def test_cli_bad_data_inside_the_flow_is_one_line(tmp_path):
    for name in ("a", "b"):
        (tmp_path / "data" / name).mkdir(parents=True)
        (tmp_path / "data" / name / "x.jpg").write_bytes(b"garbage")
    result = _headstart(
        "train",
        "--data",
        str(tmp_path / "data"),
        "--cache-dir",
        str(tmp_path / "cache"),
        tmp_path=tmp_path,
        check=False,
    )
    assert result.returncode == 2
    assert "no usable images" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_file_rewritten_between_scan_and_extraction_is_left_out_of_the_run_and_reported(
    prefect_harness, colour_folder, tiny_backbone_dir, tmp_path, monkeypatch
):
    from prefect.artifacts import Artifact

    import tasks.data
    from flows.train import train
    from headstart.backbone.handles import resolve_backbone
    from headstart.features.cache import FeatureCache

    real_prepare_source = tasks.data.prepare_source
    rewritten = {}

    def prepare_then_rewrite(data, cache_dir, show_progress=False):
        manifest, report = real_prepare_source(data, cache_dir, show_progress)
        table = manifest.read()
        path, sha = table.column("path")[0].as_py(), table.column("sha256")[0].as_py()
        Path(path).write_bytes((colour_folder / "blue" / "000.png").read_bytes() + b"appended after the scan")
        rewritten.update(path=path, sha256=sha)
        return manifest, report

    monkeypatch.setattr(tasks.data, "prepare_source", prepare_then_rewrite)
    config = _smoke_config(colour_folder, tiny_backbone_dir, tmp_path, gate=False)
    run = Run(train(**config.flat()))
    (entry,) = [
        entry
        for entry in json.loads((run.path / "data_report.json").read_text())["skipped"]
        if entry["path"] == rewritten["path"]
    ]
    assert entry["reason"].startswith("changed after it was scanned")
    assert rewritten["path"] in Artifact.get("headstart-data").data
    assert sum(split.images for split in run.lineage.data.splits.values()) == 47
    backbone = resolve_backbone(config.backbone.handle, config.backbone.image_size, config.runtime.cache_dir)
    assert rewritten["sha256"] not in FeatureCache(config.runtime.cache_dir, backbone).cached_hashes()


def test_a_predict_running_while_the_champion_switches_uses_one_model_from_start_to_end(
    prefect_harness, colour_folder, tiny_backbone_dir, tmp_path, monkeypatch
):
    import pyarrow.parquet as pq
    from prefect.artifacts import Artifact

    import headstart.serving.predict
    from flows.predict import predict
    from flows.train import train
    from headstart.registry import versions as registry

    config = _smoke_config(colour_folder, tiny_backbone_dir, tmp_path)
    first = Path(train(**config.flat()))
    swapped = _with_swapped_training_labels(
        colour_folder, tmp_path / "swapped", config.data.validation_fraction, config.data.test_fraction
    )
    second = Path(train(**config.with_options(**{"data": str(swapped), "gate": False}).flat()))
    assert registry.champion_version(tmp_path / "artifacts") == first.name

    real_batches = headstart.serving.predict.decoded_batches
    batches_seen = []

    def batches_then_a_retrain_promotes(*args, **kwargs):
        for batch in real_batches(*args, **kwargs):
            yield batch
            batches_seen.append(len(batch.indices))
            if len(batches_seen) == 1:  # the retrain finishes while the first batch is being labelled
                registry.promote(tmp_path / "artifacts", second.name, "retrained", by="gate")

    monkeypatch.setattr(headstart.serving.predict, "decoded_batches", batches_then_a_retrain_promotes)
    places = dict(artifacts_root=tmp_path / "artifacts", cache_dir=tmp_path / "cache", batch_size=8)
    predict(inputs=[str(colour_folder)], output=tmp_path / "during.parquet", **places)
    assert len(batches_seen) == 6 and registry.champion_version(tmp_path / "artifacts") == second.name
    assert first.name in Artifact.get("headstart-predictions").description
    monkeypatch.setattr(headstart.serving.predict, "decoded_batches", real_batches)
    predict(inputs=[str(colour_folder)], output=tmp_path / "after.parquet", **places)

    def labels_by_path(name):
        table = pq.read_table(tmp_path / name).to_pydict()
        return dict(zip(table["path"], table["label"]))

    paths = sorted(str(path) for path in colour_folder.glob("*/*.png"))
    during, after = labels_by_path("during.parquet"), labels_by_path("after.parquet")
    truth = {path: Path(path).parent.name for path in paths}
    assert sum(during[p] == truth[p] for p in paths) >= 44  # every batch labelled by the first champion
    assert sum(after[p] != during[p] for p in paths) >= 24  # the new champion labels otherwise
