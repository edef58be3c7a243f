"""The deployments, run as a team runs them: a real `prefect server start` (on SQLite, and on a
real PostgreSQL), the work pool and queue and `prefect deploy --all` as the README says, a real
process worker, and runs triggered with `prefect deployment run … --param` one field at a time.

A first `train` becomes the champion; `retrain-nightly` on data that teaches a worse model
(every training and validation label swapped, the test images left right) leaves the champion
where it was and says why in the gate artifact; `predict` then labels a folder through its own
deployment and lists the unreadable file in it. Everything is torn down even when a step fails.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_class_images
from servers import PROJECT, postgres_database, postgres_unavailable, prefect_env, prefect_server, process_worker
from servers import api as _api

pytestmark = pytest.mark.e2e
COLOURS = {"day": (230, 200, 40), "night": (20, 30, 90)}


class Deployed:
    """A server with the project's deployments and a worker; runs `prefect` commands against it."""

    def __init__(self, url: str, home: Path, work: Path, worker_log: Path):
        self.url, self.home, self.work, self.worker_log = url, home, work, worker_log

    def prefect(self, *args: str, timeout: float = 120) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "prefect", *args],
            cwd=PROJECT,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=prefect_env(self.home, f"{self.url}/api", PWD=str(PROJECT), COLUMNS="250"),
        )
        assert result.returncode == 0, (
            f"prefect {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
        return result.stdout

    def run(self, deployment: str, **parameters) -> dict:
        """Triggers a run with `--param NAME=VALUE` per parameter, waits for it, returns the flow run."""
        options = [item for name, value in parameters.items() for item in ("--param", f"{name}={json.dumps(value)}")]
        try:
            output = self.prefect(
                "deployment",
                "run",
                deployment,
                *options,
                "--watch",
                "--watch-interval",
                "2",
                "--watch-timeout",
                "900",
                timeout=960,
            )
        except AssertionError as failure:
            raise AssertionError(f"{failure}\nworker log:\n{self.worker_log.read_text()[-4000:]}") from None
        flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", output).group(1)
        return _api(self.url, f"/flow_runs/{flow_run_id}")

    def artifacts(self, flow_run: dict) -> list[dict]:
        return _api(self.url, "/artifacts/filter", {"flow_runs": {"id": {"any_": [flow_run["id"]]}}})

    def headstart(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "flows.cli", *args],
            cwd=PROJECT,
            capture_output=True,
            text=True,
            timeout=300,
            env=prefect_env(self.home, f"{self.url}/api"),
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def deployed(request, tmp_path_factory):
    if request.param == "postgresql" and (reason := postgres_unavailable()):
        pytest.skip(reason)
    home = tmp_path_factory.mktemp(f"prefect-home-{request.param}")
    work = tmp_path_factory.mktemp(f"deployments-{request.param}")
    with postgres_database() if request.param == "postgresql" else _no_database() as database_url:
        with prefect_server(home, database_url) as url:
            setup = Deployed(url, home, work, work / "worker.log")
            # The README's commands, in its order.
            setup.prefect("work-pool", "create", "headstart", "--type", "process")
            setup.prefect("work-queue", "create", "training", "--pool", "headstart", "--limit", "1")
            setup.prefect("deploy", "--all", timeout=300)
            # The watch's schedule would look at the bundled demo set meanwhile (tests/test_watch.py runs looks).
            watch = next(d for d in _api(url, "/deployments/filter", {}) if d["name"] == "watch")
            setup.prefect("deployment", "schedule", "pause", "watch/watch", watch["schedules"][0]["id"])
            with process_worker(home, f"{url}/api", "headstart", setup.worker_log):
                yield setup


class _no_database:
    def __enter__(self):
        return None

    def __exit__(self, *_):
        return False


def test_prefect_yaml_deploys_three_deployments_with_the_nightly_schedule(deployed):
    listing = deployed.prefect("deployment", "ls")
    assert {"train/train", "train/retrain-nightly", "predict/predict"} <= set(re.findall(r"\b(\w+/[\w-]+)\b", listing))
    by_name = {d["name"]: d for d in _api(deployed.url, "/deployments/filter", {})}
    assert [(s["schedule"]["cron"], s["schedule"]["timezone"]) for s in by_name["retrain-nightly"]["schedules"]] == [
        ("0 3 * * *", "UTC")
    ]
    assert by_name["train"]["schedules"] == [] and by_name["retrain-nightly"]["parameters"]["gate"] is True
    assert all(d["work_pool_name"] == "headstart" for d in by_name.values())
    # The run form shows every config field with its description.
    schema = by_name["train"]["parameter_openapi_schema"]
    assert schema["required"] == ["data"] and "backbone sees" in schema["properties"]["image_size"]["description"]
    queue = _api(deployed.url, "/work_pools/headstart/queues/training")
    assert queue["concurrency_limit"] == 1


def test_train_then_a_worse_retrain_then_predict(deployed):
    work = deployed.work
    good = write_class_images(work / "good", COLOURS, per_class=40)
    worse = _labels_swapped_outside_the_test_split(good, work / "worse")
    places = {"artifacts_root": str(work / "artifacts"), "cache_dir": str(work / "cache")}

    first = deployed.run("train/train", data=str(good), image_size=96, learning_rate=0.01, **places)
    assert first["state"]["type"] == "COMPLETED"
    champion = _champion(deployed, work)
    run_dir = Path(_persisted_result(first))
    assert champion["path"] == str(run_dir) and json.loads((run_dir / "metrics.json").read_text())["accuracy"] == 1.0
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["image_size"], config["learning_rate"], config["epochs"]) == (
        96,
        0.01,
        30,
    )  # the other fields keep their defaults
    artifacts = deployed.artifacts(first)
    progress = [a for a in artifacts if a["type"] == "progress"]
    assert progress and all(a["data"] == 100.0 for a in progress)
    assert any("train head" in a["description"] for a in progress) and any(
        "extract features" in a["description"] for a in progress
    )

    second = deployed.run("train/retrain-nightly", data=str(worse), image_size=96, learning_rate=0.01, **places)
    assert second["state"]["type"] == "COMPLETED"  # a kept champion is not a failure
    assert second["parameters"]["gate"] is True and second["parameters"]["data"] == str(
        worse
    )  # the deployment's value merged with the run's
    assert _champion(deployed, work)["version"] == champion["version"]
    gate = next(a for a in deployed.artifacts(second) if a["key"] == "headstart-gate")
    figures = {row["figure"]: row["value"] for row in json.loads(gate["data"])}
    assert figures["decision"] == "keep the champion" and gate["description"].startswith(
        f"kept champion {champion['version']}"
    )
    assert figures["champion_accuracy"] == 1.0 and figures["candidate_accuracy"] < 0.5

    inbox = work / "inbox"
    shutil.copytree(good / "night", inbox)
    (inbox / "broken.jpg").write_bytes(b"not an image")
    output = work / "predictions.csv"
    third = deployed.run("predict/predict", inputs=[str(inbox)], output=str(output), **places)
    assert third["state"]["type"] == "COMPLETED"
    rows = list(csv.DictReader(output.open()))
    assert len(rows) == 40 and {row["label"] for row in rows} == {"night"}
    table = next(a for a in deployed.artifacts(third) if a["key"] == "headstart-predictions")
    skipped = [row for row in json.loads(table["data"]) if row["label"].startswith("(skipped")]
    assert [row["path"] for row in skipped] == [str(inbox / "broken.jpg")]

    worker_log = deployed.worker_log.read_text()
    # TensorFlow's GPU probing notices, not the word: a run's random name may hold it ('barracuda').
    for noise in ("pkg_resources is deprecated", "cuda drivers", "cudart", "cuInit", "img/s]"):
        assert noise not in worker_log, f"worker log carries {noise!r}"


def _labels_swapped_outside_the_test_split(source: Path, destination: Path) -> Path:
    """The same images, each training and validation image filed under the other class: a model
    trained on them gets the (correctly filed) test images wrong."""
    from headstart.data.manifest import assign_split
    from headstart.infra.storage import file_sha256

    names = sorted(COLOURS)
    for name in names:
        other = names[1 - names.index(name)]
        for image in sorted((source / name).iterdir()):
            held_out = assign_split(file_sha256(image), 0.1, 0.1) == "test"
            target = destination / (name if held_out else other) / image.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(image, target.with_name(f"{name}-{image.name}"))
    return destination


def _champion(deployed: Deployed, work: Path) -> dict:
    versions = json.loads(deployed.headstart("models", "--json", "--artifacts-root", str(work / "artifacts")))
    return next(version for version in versions if version["champion"])


def _persisted_result(flow_run: dict):
    """The flow's return value, read from where the worker persisted it (as JSON)."""
    return json.loads(Path(flow_run["state"]["data"]["storage_key"]).read_text())


def test_headstart_serve_runs_the_same_deployments_without_a_worker(tmp_path):
    home = tmp_path / "prefect-home"
    home.mkdir()
    data = write_class_images(tmp_path / "data", COLOURS, per_class=40)
    with prefect_server(home) as url, open(tmp_path / "serve.log", "w") as log:
        serve = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "serve"],
            cwd=PROJECT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=prefect_env(home, f"{url}/api"),
            start_new_session=True,
        )
        try:
            served = Deployed(url, home, tmp_path, tmp_path / "serve.log")
            deadline = time.monotonic() + 180
            while len(_api(url, "/deployments/filter", {})) < 3:
                assert serve.poll() is None and time.monotonic() < deadline, served.worker_log.read_text()[-3000:]
                time.sleep(1)
            nightly = next(d for d in _api(url, "/deployments/filter", {}) if d["name"] == "retrain-nightly")
            assert nightly["work_pool_name"] is None and nightly["schedules"][0]["schedule"]["cron"] == "0 3 * * *"
            flow_run = served.run(
                "train/train",
                data=str(data),
                image_size=96,
                artifacts_root=str(tmp_path / "artifacts"),
                cache_dir=str(tmp_path / "cache"),
            )
            assert flow_run["state"]["type"] == "COMPLETED"
            assert _champion(served, tmp_path)["path"] == _persisted_result(flow_run)
        finally:
            os.killpg(serve.pid, signal.SIGTERM)
            serve.wait(timeout=60)
