"""Failures of deployment runs, as a scheduled run meets them: a real `prefect server start`
(SQLite), the work pool, `prefect deploy --all` and a process worker, as the README sets them up.

A `train` run on a folder that is not there ends Failed with the one line as its state message,
logged once at ERROR and without a traceback, in the run's log (what the dashboard shows) and in
the worker's; the worker serves the next runs. `predict` given no `output` keeps its labels in a
file under the artifacts root and lists each image in its table; `predict` on a path that is not
there ends Failed in one line.
"""

from __future__ import annotations

import csv
import json
import re
import time
from pathlib import Path

import pytest
from conftest import write_class_images
from servers import prefect_server, process_worker
from test_deployments import Deployed, _api

pytestmark = pytest.mark.e2e
COLOURS = {"day": (230, 200, 40), "night": (20, 30, 90)}
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    work = tmp_path_factory.mktemp("unattended")
    with prefect_server(home) as url:
        setup = Deployed(url, home, work, work / "worker.log")
        setup.prefect("work-pool", "create", "headstart", "--type", "process")
        setup.prefect("work-queue", "create", "training", "--pool", "headstart", "--limit", "1")
        setup.prefect("deploy", "--all", timeout=300)
        with process_worker(home, f"{url}/api", "headstart", setup.worker_log):
            yield setup


def _finished(deployed: Deployed, deployment: str, **parameters) -> dict:
    """Triggers a run (`--param NAME=VALUE` each) and waits for its final state, whichever it is."""
    options = [item for name, value in parameters.items() for item in ("--param", f"{name}={json.dumps(value)}")]
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", deployed.prefect("deployment", "run", deployment, *options))[1]
    deadline = time.monotonic() + 900
    while (flow_run := _api(deployed.url, f"/flow_runs/{flow_run_id}"))["state"]["type"] not in FINAL:
        assert time.monotonic() < deadline, deployed.worker_log.read_text()[-4000:]
        time.sleep(2)
    return flow_run


def _logs(deployed: Deployed, flow_run: dict) -> list[dict]:
    """The run's log as the dashboard reads it. The worker's process sends its last lines as it
    exits, after the final state: they are waited for."""
    deadline = time.monotonic() + 60
    while True:
        logs = _api(deployed.url, "/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run["id"]]}}})
        if any(log["message"].startswith("Finished in state") for log in logs) or time.monotonic() > deadline:
            return logs


@pytest.fixture(scope="module")
def places(deployed) -> dict[str, str]:
    return {"artifacts_root": str(deployed.work / "artifacts"), "cache_dir": str(deployed.work / "cache")}


def test_a_run_on_a_missing_folder_fails_in_one_line_and_the_worker_serves_on(deployed, places):
    missing = deployed.work / "no-such-folder"
    failed = _finished(deployed, "train/train", data=str(missing), image_size=96, **places)
    line = f"data folder not found: {missing} (give a folder of class sub-folders, or 'cifar10')"
    assert failed["state"]["type"] == "FAILED" and failed["state"]["message"] == line
    logs = _logs(deployed, failed)
    assert [log["message"] for log in logs if log["level"] >= 40] == [line]
    assert not [log for log in logs if "Traceback" in log["message"]]
    worker_log = deployed.worker_log.read_text()
    assert "Traceback" not in worker_log and "unexpected exception" not in worker_log, worker_log[-4000:]
    assert [entry for entry in worker_log.splitlines() if "| ERROR" in entry and line in entry] != []

    good = write_class_images(deployed.work / "good", COLOURS, per_class=20)
    trained = _finished(deployed, "train/train", data=str(good), image_size=96, **places)
    assert trained["state"]["type"] == "COMPLETED", deployed.worker_log.read_text()[-4000:]


def test_predict_without_output_keeps_its_labels_and_lists_each_image(deployed, places):
    (run_dir,) = [path for path in Path(places["artifacts_root"]).iterdir() if path.name != "predictions"]
    inbox = deployed.work / "inbox"
    write_class_images(inbox, {"night": COLOURS["night"]}, per_class=6, seed=1)
    (inbox / "night" / "broken.jpg").write_bytes(b"not an image")
    labelled = _finished(deployed, "predict/predict", inputs=[str(inbox)], model=str(run_dir), **places)
    assert labelled["state"]["type"] == "COMPLETED", deployed.worker_log.read_text()[-4000:]
    (kept,) = (Path(places["artifacts_root"]) / "predictions").iterdir()
    assert kept.name.endswith(f"-{labelled['name']}.csv")
    rows = list(csv.DictReader(kept.open()))
    assert len(rows) == 6 and {row["label"] for row in rows} == {"night"}
    result = json.loads(Path(labelled["state"]["data"]["storage_key"]).read_text())
    assert result.endswith(f"predictions in {kept}")
    (table,) = [a for a in deployed.artifacts(labelled) if a["key"] == "headstart-predictions"]
    listed = {row["path"]: row for row in json.loads(table["data"])}
    assert {row["path"] for row in rows} < set(listed) and str(kept) in table["description"]
    assert listed[str(inbox / "night" / "broken.jpg")]["label"].startswith("(skipped: cannot decode")
    warnings = [log["message"] for log in _logs(deployed, labelled) if log["level"] == 30]
    assert any(message.startswith("headstart: 1 file skipped: ") for message in warnings)


def test_predict_on_a_missing_path_fails_in_one_line(deployed, places):
    missing = deployed.work / "no-such-inbox"
    failed = _finished(deployed, "predict/predict", inputs=[str(missing)], **places)
    line = f"no image to label: {missing} not found; give image files or folders holding images"
    assert failed["state"]["type"] == "FAILED" and failed["state"]["message"] == line
    logs = _logs(deployed, failed)
    assert [log["message"] for log in logs if log["level"] >= 40] == [line]
    assert "Traceback" not in deployed.worker_log.read_text()
