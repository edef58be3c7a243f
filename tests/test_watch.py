"""Retraining when data lands, run as a team runs it: a real `prefect server start` (SQLite), the
work pool and queue, `prefect deploy --all` and a process worker, as the README says.

A first `train` makes the champion on a folder; the `watch` deployment's first look at the folder
records it, a second look finds it unchanged: no event, no retrain. Images are added; the next
look emits `headstart.data.changed`, and the `retrain` deployment's trigger starts a retrain on
that folder, which the gate decides on. `headstart data changed PATH` emits the same event; the
retrain it starts finds every input identical and trains nothing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest
from conftest import write_class_images
from servers import PROJECT, prefect_env, prefect_server, process_worker

pytestmark = pytest.mark.e2e
COLOURS = {"day": (230, 200, 40), "night": (20, 30, 90)}


def _api(url: str, path: str, body: dict | None = None, method: str | None = None):
    request = urllib.request.Request(
        f"{url}/api{path}",
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method=method,
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        text = response.read()
    return json.loads(text) if text else None


class Deployed:
    def __init__(self, url: str, home: Path, work: Path):
        self.url, self.home, self.work = url, home, work
        self.worker_log = work / "worker.log"
        self.places = {"artifacts_root": str(work / "artifacts"), "cache_dir": str(work / "cache")}

    def command(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", *args],
            cwd=PROJECT,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=prefect_env(self.home, f"{self.url}/api", PWD=str(PROJECT), COLUMNS="250"),
        )

    def prefect(self, *args: str, timeout: float = 300) -> str:
        result = self.command("prefect", *args, timeout=timeout)
        assert result.returncode == 0, f"prefect {' '.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return result.stdout

    def deployment(self, name: str) -> dict:
        return next(d for d in _api(self.url, "/deployments/filter", {}) if d["name"] == name)

    def run(self, deployment: str, **parameters) -> dict:
        """Triggers a run with `--param NAME=VALUE` each, waits for it, returns the flow run."""
        options = [item for name, value in parameters.items() for item in ("--param", f"{name}={json.dumps(value)}")]
        output = self.prefect(
            "deployment", "run", deployment, *options, "--watch", "--watch-interval", "2", timeout=900
        )
        flow_run_id = output.split("UUID: ", 1)[1].split()[0]
        flow_run = _api(self.url, f"/flow_runs/{flow_run_id}")
        assert flow_run["state"]["type"] == "COMPLETED", self.worker_log.read_text()[-4000:]
        return flow_run

    def flow_runs(self, deployment: str) -> list[dict]:
        body = {"deployments": {"id": {"any_": [self.deployment(deployment)["id"]]}}, "sort": "START_TIME_ASC"}
        return _api(self.url, "/flow_runs/filter", body)

    def finished(self, deployment: str, count: int, timeout: float = 900) -> list[dict]:
        """The deployment's flow runs once `count` of them have ended."""
        deadline = time.monotonic() + timeout
        while True:
            runs = self.flow_runs(deployment)
            if len([run for run in runs if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED")]) >= count:
                return runs
            assert time.monotonic() < deadline, f"{runs}\n{self.worker_log.read_text()[-4000:]}"
            time.sleep(2)

    def data_events(self, count: int, timeout: float = 60) -> list[dict]:
        """The headstart.data.changed events, oldest first, once there are `count` (the server
        stores events a moment after it takes them)."""
        body = {"filter": {"event": {"name": ["headstart.data.changed"]}, "order": "ASC"}, "limit": 50}
        deadline = time.monotonic() + timeout
        while len(events := _api(self.url, "/events/filter", body)["events"]) < count:
            assert time.monotonic() < deadline, events
            time.sleep(1)
        return events

    def champion(self) -> dict:
        result = self.command("flows.cli", "models", "--json", "--artifacts-root", self.places["artifacts_root"])
        assert result.returncode == 0, result.stderr
        return next(version for version in json.loads(result.stdout) if version["champion"])


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    work = tmp_path_factory.mktemp("watch")
    with prefect_server(home) as url:
        setup = Deployed(url, home, work)
        setup.prefect("work-pool", "create", "headstart", "--type", "process")
        setup.prefect("work-queue", "create", "training", "--pool", "headstart", "--limit", "1")
        setup.prefect("deploy", "--all")
        # The test runs each look itself; the schedule's own looks would watch the bundled demo set.
        watch = setup.deployment("watch")
        for schedule in watch["schedules"]:
            _api(url, f"/deployments/{watch['id']}/schedules/{schedule['id']}", {"active": False}, "PATCH")
        # A retrain started by the trigger keeps its registry and cache in the test's folder.
        retrain = setup.deployment("retrain")
        parameters = {**retrain["parameters"], "image_size": 96, **setup.places}
        _api(url, f"/deployments/{retrain['id']}", {"parameters": parameters}, "PATCH")
        with process_worker(home, f"{url}/api", "headstart", setup.worker_log):
            yield setup


def test_the_watch_and_retrain_deployments_are_deployed_with_their_schedule_and_trigger(deployed):
    watch = deployed.deployment("watch")
    assert [s["schedule"]["interval"] for s in watch["schedules"]] == [300.0]
    retrain = deployed.deployment("retrain")
    assert retrain["parameters"]["gate"] is True and retrain["work_queue_name"] == "training"
    automations = _api(deployed.url, "/automations/filter", {})
    (trigger,) = [a for a in automations if a["name"] == "retrain when data changes"]
    assert trigger["trigger"]["expect"] == ["headstart.data.changed"] and trigger["enabled"]
    assert trigger["actions"][0]["deployment_id"] == retrain["id"]


def test_new_images_start_a_retrain_through_the_trigger_and_an_unchanged_folder_none(deployed):
    data = write_class_images(deployed.work / "data", COLOURS, per_class=40)
    first = deployed.run("train/train", data=str(data), image_size=96, **deployed.places)
    champion = deployed.champion()
    assert json.loads(Path(first["state"]["data"]["storage_key"]).read_text()) == champion["path"]

    looks = [deployed.run("watch/watch", data=str(data), cache_dir=deployed.places["cache_dir"]) for _ in range(2)]
    assert looks[0]["state"]["message"].startswith(f"first look at {data}: 80 images in 2 classes")
    assert "unchanged since the last look" in looks[1]["state"]["message"]
    assert deployed.flow_runs("retrain") == []

    write_class_images(deployed.work / "more", COLOURS, per_class=10, seed=1)
    for name in COLOURS:
        for image in sorted((deployed.work / "more" / name).iterdir()):
            shutil.copy(image, data / name / f"new-{image.name}")
    asked = time.time()
    look = deployed.run("watch/watch", data=str(data), cache_dir=deployed.places["cache_dir"])
    assert "20 images added, 0 removed" in look["state"]["message"] and "emitted" in look["state"]["message"]
    (event,) = deployed.data_events(1)  # the two looks before emitted none
    assert event["resource"]["prefect.resource.id"] == f"headstart.data.{data}"
    assert event["payload"]["counts"] == {"day": 50, "night": 50} and event["payload"]["added"] == 20

    (retrain,) = deployed.finished("retrain", 1)
    assert retrain["state"]["type"] == "COMPLETED", deployed.worker_log.read_text()[-4000:]
    assert retrain["parameters"]["data"] == str(data) and retrain["parameters"]["gate"] is True
    run_dir = Path(json.loads(Path(retrain["state"]["data"]["storage_key"]).read_text()))
    gate = json.loads((run_dir / "lineage.json").read_text())["gate"]
    assert json.loads((run_dir / "data_report.json").read_text())["counts"]  # trained on the folder as it is now
    expected = run_dir.name if gate["promote"] else champion["version"]
    assert deployed.champion()["version"] == expected
    seconds = _time(retrain["end_time"]).timestamp() - asked
    print(
        f"\nwatch run asked for → finished retrain: {seconds:.1f} s (watch flow run {_duration(look):.1f} s, "
        f"event → retrain start {(_time(retrain['start_time']) - _time(event['occurred'])).total_seconds():.1f} s, "
        f"retrain {_duration(retrain):.1f} s; gate: {gate['reason']})"
    )

    # A script that copied data in says so; the retrain it starts finds every input unchanged.
    said = deployed.command("flows.cli", "data", "changed", str(data), "--cache-dir", deployed.places["cache_dir"])
    assert said.returncode == 0 and "headstart.data.changed emitted" in said.stdout, said.stderr
    told = deployed.data_events(2)[1]
    assert told["payload"]["noticed_by"] == "headstart data changed" and told["payload"]["added"] == 0
    again = deployed.finished("retrain", 2)[1]
    assert again["state"]["type"] == "COMPLETED", deployed.worker_log.read_text()[-4000:]
    assert json.loads(Path(again["state"]["data"]["storage_key"]).read_text()) == str(run_dir)
    print(f"a retrain on unchanged data: {_duration(again):.1f} s (nothing trained)")


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _duration(flow_run: dict) -> float:
    return (_time(flow_run["end_time"]) - _time(flow_run["start_time"])).total_seconds()
