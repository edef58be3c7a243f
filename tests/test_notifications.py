"""Someone is told, through a real server, `prefect deploy --all` and a process worker: a webhook
receiver on 127.0.0.1 stands for Slack or e-mail behind a Custom Webhook notification block;
`headstart notify` sets up the automations; a deployment run on a missing folder fails and the
receiver hears of it; a first model the gate keeps out is heard of too; then a promotion puts the
champion on the dashboard (its variable and artifact) and the run's state message says so."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import write_class_images
from servers import PROJECT, free_port, prefect_env, prefect_server, process_worker
from test_deployments import COLOURS, Deployed, _api, _labels_swapped_outside_the_test_split

pytestmark = pytest.mark.e2e
BLOCK = "headstart-e2e"
# Generous: a notification is a few seconds after the run ends; the bound only keeps a broken
# automation from hanging the suite.
NOTIFICATION_WAIT_SECONDS = 180


class Receiver:
    """A webhook endpoint on 127.0.0.1 that keeps every JSON body posted to it."""

    def __init__(self):
        self.received: list[dict] = []
        self.arrived = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.arrived:
                    receiver.received.append(json.loads(body))
                    receiver.arrived.notify_all()
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *_):
        self.server.shutdown()
        self.server.server_close()

    def wait_for(self, needle: str) -> dict:
        """The first notification whose subject or body holds `needle`, waiting for it."""
        deadline = time.monotonic() + NOTIFICATION_WAIT_SECONDS
        with self.arrived:
            while True:
                for message in self.received:
                    if needle in message["subject"] or needle in message["body"]:
                        return message
                left = deadline - time.monotonic()
                assert left > 0, f"no notification about {needle!r}; received: {self.received}"
                self.arrived.wait(timeout=left)


@pytest.fixture(scope="module")
def told(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home-notifications")
    work = tmp_path_factory.mktemp("notifications")
    with Receiver() as receiver, prefect_server(home) as url:
        setup = Deployed(url, home, work, work / "worker.log")
        setup.prefect("work-pool", "create", "headstart", "--type", "process")
        setup.prefect("work-queue", "create", "training", "--pool", "headstart", "--limit", "1")
        setup.prefect("deploy", "--all", timeout=300)
        # The watch's schedule would look at the bundled demo set meanwhile, and start a retrain on it.
        watch = next(d for d in _api(url, "/deployments/filter", {}) if d["name"] == "watch")
        setup.prefect("deployment", "schedule", "pause", "watch/watch", watch["schedules"][0]["id"])
        _save_webhook_block(home, f"{url}/api", receiver.url)
        print(setup.headstart("notify", "--block", f"custom-webhook/{BLOCK}"))
        with process_worker(home, f"{url}/api", "headstart", setup.worker_log):
            yield setup, receiver


def _save_webhook_block(home: Path, api_url: str, hook: str) -> None:
    """The block as a team would save it from Python (docs/unattended.md)."""
    script = (
        "from prefect.blocks.notifications import CustomWebhookNotificationBlock as Hook\n"
        f"Hook(name='team', url={hook!r}, json_data={{'subject': '{{{{subject}}}}', 'body': '{{{{body}}}}'}})"
        f".save({BLOCK!r})\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120, env=prefect_env(home, api_url), cwd=PROJECT)


def _run(deployed: Deployed, deployment: str, **parameters) -> dict:
    """Triggers a run and waits for it to end, whatever its state; returns the flow run."""
    options = [item for name, value in parameters.items() for item in ("--param", f"{name}={json.dumps(value)}")]
    command = ["deployment", "run", deployment, *options, "--watch", "--watch-timeout", "900"]
    result = subprocess.run(
        [sys.executable, "-m", "prefect", *command],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=960,
        env=prefect_env(deployed.home, f"{deployed.url}/api", PWD=str(PROJECT), COLUMNS="250"),
    )
    found = re.search(r"UUID: ([0-9a-f-]{36})", result.stdout)
    assert found, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return _api(deployed.url, f"/flow_runs/{found.group(1)}")


def test_a_failed_deployment_run_is_notified_to_the_webhook(told):
    deployed, receiver = told
    flow_run = _run(deployed, "train/train", data="/does-not-exist", artifacts_root=str(deployed.work / "artifacts"))
    assert flow_run["state"]["type"] == "FAILED"
    message = receiver.wait_for(flow_run["name"])
    assert message["subject"] == f"headstart: train run {flow_run['name']} Failed"
    assert "/does-not-exist" in message["body"]
    assert f"{deployed.url}/runs/flow-run/{flow_run['id']}" in message["body"]  # its page on the dashboard


def test_a_kept_model_is_notified_and_a_promotion_shows_the_champion(told):
    deployed, receiver = told
    work = deployed.work
    good = write_class_images(work / "good", COLOURS, per_class=40)
    places = {"artifacts_root": str(work / "artifacts"), "cache_dir": str(work / "cache"), "image_size": 96}

    # Labels swapped outside the test split: the first model is worse than always answering one
    # class, so the gate keeps it out, and there is no champion yet.
    worse = _labels_swapped_outside_the_test_split(good, work / "worse")
    kept = _run(deployed, "train/retrain-nightly", data=str(worse), **places)
    assert kept["state"]["type"] == "COMPLETED"
    assert " not promoted: first model not promoted" in kept["state"]["message"]
    version = kept["state"]["message"].split(" ")[0]
    notified = receiver.wait_for(version)
    assert notified["subject"] == f"headstart: {version} not promoted by the gate"
    assert kept["state"]["message"] in notified["body"] and str(work / "artifacts" / version) in notified["body"]
    assert f"{deployed.url}/runs/flow-run/{kept['id']}" in notified["body"]

    promoted = _run(deployed, "train/train", data=str(good), **places)
    message = promoted["state"]["message"]
    assert promoted["state"]["type"] == "COMPLETED" and message.startswith("promoted ")
    champion = message.split(" ")[1].rstrip(",:")
    variable = _api(deployed.url, "/variables/name/headstart_champion")["value"]
    assert variable["version"] == champion and variable["run_dir"] == str(work / "artifacts" / champion)
    metrics = json.loads((work / "artifacts" / champion / "metrics.json").read_text())
    assert variable["accuracy"] == metrics["accuracy"] and variable["by"] == "gate"
    artifact = _api(deployed.url, "/artifacts/headstart-champion/latest")
    assert artifact["flow_run_id"] == promoted["id"] and artifact["data"].startswith("**Champion** of the registry")
    assert f"# headstart run `{champion}`" in artifact["data"]
    # A promotion notifies no one.
    assert not any(champion in message["subject"] + message["body"] for message in receiver.received)
