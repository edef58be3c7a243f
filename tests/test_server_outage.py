"""A run outlives the Prefect server going away: what headstart sends for people to watch
(progress, artifacts) is best-effort and holds up no work for long, and a `train` deployment run
whose server is killed during feature extraction and started again two minutes later completes.

The unit tests use a server that is down or answers 503 (with Retry-After: 0, so Prefect's client
retries at once); the end-to-end test a real `prefect server start`, the project's deployments
and a process worker (tests/servers.py)."""

from __future__ import annotations

import http.server
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from conftest import write_class_images
from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_CLIENT_CSRF_SUPPORT_ENABLED,
    PREFECT_CLIENT_MAX_RETRIES,
    temporary_settings,
)
from servers import PROJECT, free_port, prefect_env, prefect_server, process_worker

import tasks.progress as progress_module
import tasks.reports as reports


@pytest.fixture(autouse=True)
def reachable_again(monkeypatch):
    """Every test starts with a server headstart has not seen fail."""
    monkeypatch.setattr(reports, "_state", reports._Reachability())


class Unavailable:
    """An HTTP server on 127.0.0.1 that answers every request 503 Service Unavailable, counting them."""

    def __init__(self):
        self.hits = 0
        unavailable = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self):
                unavailable.hits += 1
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(503)
                self.send_header("Retry-After", "0")
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST = do_PATCH = _answer

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/api"

    def stop(self):
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def unavailable():
    server = Unavailable()
    yield server
    server.stop()


def test_a_report_is_retried_once_whatever_the_runs_retries_then_dropped_with_one_warning(
    unavailable, monkeypatch, caplog
):
    # The deployments raise the client's retries so that a run's own state updates outlive an
    # outage; a progress bar must not wait out all of them.
    settings = {
        PREFECT_API_URL: unavailable.url,
        PREFECT_CLIENT_MAX_RETRIES: 8,
        PREFECT_CLIENT_CSRF_SUPPORT_ENABLED: False,
    }
    with temporary_settings(updates=settings), caplog.at_level(logging.WARNING, logger="headstart.reports"):
        for done in (10.0, 20.0, 30.0):
            assert reports.update_progress(uuid.uuid4(), done, "extract features") is None
        assert unavailable.hits == 1 + reports.REPORT_RETRIES  # the later ones were skipped
        monkeypatch.setattr(reports, "QUIET_SECONDS", 0.0)
        reports.update_progress(uuid.uuid4(), 40.0, "extract features")
        assert unavailable.hits == 2 * (1 + reports.REPORT_RETRIES)  # tried again after the quiet spell
        assert PREFECT_CLIENT_MAX_RETRIES.value() == 8  # the run's own setting is left alone
    warnings = [record.getMessage() for record in caplog.records if record.name == "headstart.reports"]
    assert len(warnings) == 1 and "the work goes on" in warnings[0]


def test_a_report_to_a_server_that_is_down_is_dropped():
    with socket_closed() as url, temporary_settings(updates={PREFECT_API_URL: url}):
        assert reports.update_progress(uuid.uuid4(), 50.0, "train head") is None
        assert reports.table_artifact("headstart-metrics", [{"accuracy": 1.0}], "metrics") is None
    assert reports._state.failed_at is not None and reports._state.warned


class socket_closed:
    """The API URL of a port nothing listens on."""

    def __enter__(self) -> str:
        return f"http://127.0.0.1:{free_port()}/api"

    def __exit__(self, *_):
        return False


def test_a_progress_bar_the_server_did_not_take_is_created_when_it_is_back(monkeypatch):
    answers = iter([None, None, "bar"])  # the server is down for the first two attempts
    created, moved = [], []

    def create(progress, description):
        created.append(progress)
        return next(answers)

    monkeypatch.setattr(progress_module, "progress_artifact", create)
    monkeypatch.setattr(progress_module, "update_progress", lambda bar, progress, _: moved.append((bar, progress)))
    bar = progress_module.DashboardProgress(total=4, description="extract features", interval=0.0)
    for _ in range(4):
        bar.update(1)
    assert created == [0.0, 25.0, 50.0]  # created, with the work done so far, once the server took it
    assert moved == [("bar", 75.0), ("bar", 100.0)]


# ---------------------------------------------------------------------------------------------
# End to end: a real server killed mid-extraction for two minutes.

OUTAGE_SECONDS = 120
COLOURS = {"day": (230, 200, 40), "night": (20, 30, 90)}
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _api(url: str, path: str, body: dict | None = None):
    request = urllib.request.Request(
        f"{url}/api{path}",
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _prefect(home: Path, url: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "prefect", *args],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=300,
        env=prefect_env(home, f"{url}/api", PWD=str(PROJECT), COLUMNS="250"),
    )
    assert result.returncode == 0, f"prefect {' '.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def _poll(what: str, check, timeout: float):
    """Polls `check` until it returns something true; fails naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return found


def _tasks(url: str, flow_run_id: str) -> list[dict]:
    return _api(url, "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})


@pytest.mark.e2e
def test_a_train_run_outlives_a_two_minute_server_outage_during_extraction(tmp_path):
    home, work = tmp_path / "prefect-home", tmp_path / "work"
    home.mkdir()
    # Enough images at the backbone's usual size that extraction is still going when the
    # server is killed, in shards so that several progress bars meet the outage.
    data = write_class_images(work / "data", COLOURS, per_class=300, size=96)
    port, started = free_port(), []
    worker_log = work / "worker.log"
    with prefect_server(home, started=started, port=port) as url:
        _prefect(home, url, "work-pool", "create", "headstart", "--type", "process")
        _prefect(home, url, "work-queue", "create", "training", "--pool", "headstart", "--limit", "1")
        _prefect(home, url, "deploy", "--all")
        with process_worker(home, f"{url}/api", "headstart", worker_log):
            parameters = {
                "data": str(data),
                "image_size": 224,
                "extraction_shard_size": 25,
                "artifacts_root": str(work / "artifacts"),
                "cache_dir": str(work / "cache"),
            }
            options = [o for name, value in parameters.items() for o in ("--param", f"{name}={json.dumps(value)}")]
            output = _prefect(home, url, "deployment", "run", "train/train", *options)
            flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", output).group(1)

            def extracting():
                ended = _api(url, f"/flow_runs/{flow_run_id}")["state_type"] in TERMINAL
                assert not ended, worker_log.read_text()[-3000:]
                tasks = _tasks(url, flow_run_id)
                return any(t["name"].startswith("extract_features") and t["state_type"] == "RUNNING" for t in tasks)

            _poll("extraction", extracting, timeout=600)
            os.killpg(started[0].pid, signal.SIGKILL)
            started[0].wait()
            time.sleep(OUTAGE_SECONDS)
            with prefect_server(home, port=port):  # the same server, back
                flow_run = _poll(
                    "the run's end",
                    lambda: (run := _api(url, f"/flow_runs/{flow_run_id}"))["state_type"] in TERMINAL and run,
                    timeout=900,
                )
                log = worker_log.read_text()
                assert flow_run["state_type"] == "COMPLETED", log[-4000:]
                # The outage met the extraction: a progress bar's report was dropped before the last shard was done.
                warning = log.index("the Prefect server did not take the progress")
                assert warning < log.index("Task run 'assemble_features")
                run_dir = Path(json.loads(Path(flow_run["state"]["data"]["storage_key"]).read_text()))
                assert (run_dir / "metrics.json").is_file()
                # The run's log holds the warning: the run's logs, like its task states, were sent
                # once the server was back.
                _poll(
                    "the warning in the run's log",
                    lambda: any(
                        "did not take the progress" in line["message"]
                        for line in _api(url, "/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}})
                    ),
                    timeout=120,
                )
                # The task states sent while the server was away reached it once it was back.
                _poll(
                    "every task run's final state",
                    lambda: all(t["state_type"] == "COMPLETED" for t in _tasks(url, flow_run_id)),
                    timeout=120,
                )
