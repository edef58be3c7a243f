"""End to end: a real Prefect server, the real bundled backbone, the dashboard in a real browser.

`headstart server start` keeps Prefect's server running on a free port on 127.0.0.1, as a user
starts it; `headstart train` runs with no Prefect API configured and finds that server; the
Prefect API must then show the completed run and its artifacts, and headless Chromium must
render the report's embedded plots, the gate's table and the progress of extraction and training.
The report page's screenshot replaces docs/dashboard-report.png, shown in docs/operations.md, with --refresh-docs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from servers import PROJECT, free_port, prefect_env

pytestmark = pytest.mark.e2e
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _api(url: str, path: str, body: dict) -> list | dict:
    request = urllib.request.Request(
        f"{url}/api{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def prefect_server_running(tmp_path_factory):
    """The server `headstart server start` keeps running, as a user starts it; stopped at the end."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    # No API URL: commands find the server on the host and port Prefect's settings name.
    env = prefect_env(
        home,
        PREFECT_SERVER_API_HOST="127.0.0.1",
        PREFECT_SERVER_API_PORT=str(port),
        PREFECT_UI_API_URL=f"http://127.0.0.1:{port}/api",
    )

    def headstart_server(action: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "flows.cli", "server", action],
            cwd=PROJECT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    assert "running at" in headstart_server("start")
    try:
        assert "running" in headstart_server("status")
        yield f"http://127.0.0.1:{port}", env
    finally:
        assert headstart_server("stop").startswith("Prefect server stopped")
    assert "not running" in headstart_server("status")


@pytest.fixture(scope="module")
def trained_run(prefect_server_running, tmp_path_factory):
    url, env = prefect_server_running
    work = tmp_path_factory.mktemp("e2e")
    # The project's own demo set, at a small image size: real cats and dogs on the report.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "train",
            "--data",
            str(PROJECT / "examples" / "cats-vs-dogs"),
            "--image-size",
            "96",
            "--artifacts-root",
            str(work / "artifacts"),
            "--cache-dir",
            str(work / "cache"),
        ],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"reporting to the Prefect server at {url}" in result.stderr
    return url, Path(result.stdout.strip().splitlines()[-1])


def test_the_run_is_recorded_on_the_server(trained_run):
    url, run_dir = trained_run
    flow_runs = _api(url, "/flow_runs/filter", {"flows": {"name": {"any_": ["train"]}}})
    assert [run["state"]["type"] for run in flow_runs] == ["COMPLETED"]
    task_runs = _api(url, "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_runs[0]["id"]]}}})
    steps = {"download", "prepare_backbone", "plan_extraction", "build_model", "train_head", "evaluate", "visualize"}
    assert steps | {"publish"} <= {t["name"].rsplit("-", 1)[0] for t in task_runs}
    artifacts = _api(url, "/artifacts/filter", {"flow_runs": {"id": {"any_": [flow_runs[0]["id"]]}}})
    by_key = {artifact["key"]: artifact for artifact in artifacts}
    assert (
        by_key["headstart-report"]["data"].count("data:image/png;base64,")
        == len(list((run_dir / "plots").glob("*.png")))
        >= 4
    )
    assert {"headstart-metrics", "headstart-data", "headstart-near-duplicates", "headstart-gate"} <= set(by_key)
    assert json.loads((run_dir / "metrics.json").read_text())["accuracy"] >= 0.65  # chance: 0.5


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_the_dashboard_renders_the_report_the_gate_and_the_progress(trained_run, tmp_path, request):
    from playwright.sync_api import sync_playwright

    url, run_dir = trained_run
    flow_run = _api(url, "/flow_runs/filter", {"flows": {"name": {"any_": ["train"]}}})[0]
    artifacts = _api(url, "/artifacts/filter", {"flow_runs": {"id": {"any_": [flow_run["id"]]}}})
    by_key = {artifact["key"]: artifact for artifact in artifacts if artifact["key"]}
    progress = [artifact for artifact in artifacts if artifact["type"] == "progress"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        page = browser.new_page(viewport={"width": 1400, "height": 2000})

        page.goto(
            f"{url}/artifacts/artifact/{by_key['headstart-report']['id']}", wait_until="networkidle", timeout=120_000
        )
        plots = page.locator("img[src^='data:image/png;base64,']")
        plots.first.wait_for(state="visible", timeout=60_000)
        assert plots.count() == len(list((run_dir / "plots").glob("*.png")))
        widths = plots.evaluate_all("images => images.map(image => image.complete ? image.naturalWidth : 0)")
        assert all(width > 100 for width in widths)
        assert "Test accuracy" in page.content()
        report_screenshot = (
            PROJECT / "docs" / "dashboard-report.png"
            if request.config.getoption("--refresh-docs")
            else tmp_path / "report.png"
        )
        page.screenshot(path=str(report_screenshot), full_page=True)

        page.goto(
            f"{url}/artifacts/artifact/{by_key['headstart-gate']['id']}", wait_until="networkidle", timeout=120_000
        )
        page.get_by_text("first model promoted", exact=False).first.wait_for(state="visible", timeout=60_000)
        assert page.locator("table").count() >= 1 and "candidate_accuracy" in page.locator("table").first.inner_text()
        page.screenshot(path=str(tmp_path / "gate.png"), full_page=True)

        assert {artifact["description"].split(":")[0].split(",")[0] for artifact in progress} == {
            "extract features",
            "train head",
        }
        for artifact in progress:
            page.goto(f"{url}/artifacts/artifact/{artifact['id']}", wait_until="networkidle", timeout=120_000)
            page.get_by_text("Progress: 100%").wait_for(state="visible", timeout=60_000)
            assert artifact["description"] in page.content()
        page.screenshot(path=str(tmp_path / "progress.png"), full_page=True)
        browser.close()
