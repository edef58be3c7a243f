"""End to end: a real Prefect server, the real bundled backbone, the dashboard in a real browser.

`prefect server start` runs on a free port on 127.0.0.1; `headstart train` runs as a user runs
it, pointed at that server; the Prefect API must then show the completed run and its artifacts,
and headless Chromium must render the report's embedded plots.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import write_class_images

pytestmark = pytest.mark.e2e
PROJECT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    # The dashboard calls the API at PREFECT_UI_API_URL, which defaults to port 4200.
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api"}
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{url}/api/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise RuntimeError(f"prefect server did not start: {(home / 'server.log').read_text()[-2000:]}")
        time.sleep(1)
    yield url, home
    server.terminate()
    server.wait(timeout=30)
    log.close()


def _api(url: str, path: str, body: dict) -> list | dict:
    request = urllib.request.Request(f"{url}/api{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def trained_run(prefect_server, tmp_path_factory):
    url, home = prefect_server
    work = tmp_path_factory.mktemp("e2e")
    data = write_class_images(work / "data", {"sunny": (230, 200, 40), "night": (20, 30, 90)}, per_class=30)
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": f"{url}/api"}
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "train", "--data", str(data), "--image-size", "96", "--epochs", "30",
         "--learning-rate", "0.01", "--batch-size", "8", "--artifacts-root", str(work / "artifacts"), "--cache-dir", str(work / "cache")],
        cwd=PROJECT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return url, Path(result.stdout.strip().splitlines()[-1])


def test_the_run_is_recorded_on_the_server(trained_run):
    url, run_dir = trained_run
    flow_runs = _api(url, "/flow_runs/filter", {"flows": {"name": {"any_": ["train"]}}})
    assert [run["state"]["type"] for run in flow_runs] == ["COMPLETED"]
    task_runs = _api(url, "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_runs[0]["id"]]}}})
    assert {"download", "preprocess", "build_model", "train_head", "evaluate", "visualize", "publish"} <= {t["name"].rsplit("-", 1)[0] for t in task_runs}
    artifacts = _api(url, "/artifacts/filter", {"flow_runs": {"id": {"any_": [flow_runs[0]["id"]]}}})
    by_key = {artifact["key"]: artifact for artifact in artifacts}
    assert by_key["headstart-report"]["data"].count("data:image/png;base64,") == 4
    assert json.loads((run_dir / "metrics.json").read_text())["accuracy"] >= 0.9


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_the_dashboard_renders_the_report_with_its_plots(trained_run, tmp_path):
    from playwright.sync_api import sync_playwright

    url, _ = trained_run
    artifact = _api(url, "/artifacts/filter", {"artifacts": {"key": {"any_": ["headstart-report"]}}})[0]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"],
        )
        page = browser.new_page(viewport={"width": 1400, "height": 2000})
        page.goto(f"{url}/artifacts/artifact/{artifact['id']}", wait_until="networkidle", timeout=120_000)
        plots = page.locator("img[src^='data:image/png;base64,']")
        plots.first.wait_for(state="visible", timeout=60_000)
        assert plots.count() == 4
        widths = plots.evaluate_all("images => images.map(image => image.naturalWidth)")
        assert all(width > 100 for width in widths)
        assert "Test accuracy" in page.content()
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
