"""End to end: a real Prefect server, the real bundled backbone, the dashboard in a real browser.

`headstart server start` keeps Prefect's server running on a free port on 127.0.0.1, as a user
starts it; `headstart train` runs with no Prefect API configured and finds that server; the
Prefect API must then show the completed run and its artifacts, and headless Chromium must
render the report's embedded plots, the gate's table and the progress of extraction and training.
A second train the gate turns down, and a `train` deployment run by a process worker on a folder
that does not exist, must show in the dashboard as people read it: the kept champion's state
message, the gate's table within its pane, the champion's artifact and variable, the failed run's
log. With --refresh-docs, the screenshots replace docs/dashboard-report.png (docs/operations.md),
docs/dashboard-champion.png, docs/dashboard-champion-variable.png and docs/dashboard-failed-run.png
(docs/unattended.md).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from servers import PROJECT, free_port, prefect_env, process_worker

pytestmark = pytest.mark.e2e
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _api(url: str, path: str, body: dict | None = None, method: str | None = None) -> list | dict | None:
    request = urllib.request.Request(
        f"{url}/api{path}",
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method=method,
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        answer = response.read()
    return json.loads(answer) if answer else None


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
def work(tmp_path_factory) -> Path:
    """The runs' artifacts root and feature cache, shared by every run of the module."""
    return tmp_path_factory.mktemp("e2e")


def _headstart_train(env: dict, work: Path, data: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "train",
            "--data",
            str(data),
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


@pytest.fixture(scope="module")
def trained_run(prefect_server_running, work):
    url, env = prefect_server_running
    # The project's own demo set, at a small image size: real cats and dogs on the report.
    result = _headstart_train(env, work, PROJECT / "examples" / "cats-vs-dogs")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"reporting to the Prefect server at {url}" in result.stderr
    return url, Path(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def kept_run(trained_run, prefect_server_running, work, tmp_path_factory) -> dict:
    """A train on some of the demo images, each training and validation image filed under the other
    class and the test images left right: the gate keeps the champion. Its flow run."""
    from headstart.config import DataConfig
    from headstart.data.manifest import assign_split
    from headstart.infra.storage import file_sha256

    url, env = prefect_server_running
    fractions = [DataConfig.model_fields[name].default for name in ("validation_fraction", "test_fraction")]
    swapped = tmp_path_factory.mktemp("swapped")
    for name, other in (("cat", "dog"), ("dog", "cat")):
        for image in sorted((PROJECT / "examples" / "cats-vs-dogs" / name).iterdir())[:100]:
            held_out = assign_split(file_sha256(image), *fractions) == "test"
            (swapped / (name if held_out else other)).mkdir(exist_ok=True)
            shutil.copy(image, swapped / (name if held_out else other) / image.name)
    result = _headstart_train(env, work, swapped)
    assert result.returncode == 0, result.stderr[-3000:]
    flow_runs = _api(url, "/flow_runs/filter", {"flows": {"name": {"any_": ["train"]}}, "sort": "START_TIME_DESC"})
    assert "gate: kept champion" in result.stderr and flow_runs[0]["state"]["type"] == "COMPLETED"
    return flow_runs[0]


@pytest.fixture(scope="module")
def failed_run(prefect_server_running, work) -> dict:
    """A `train` deployment run, by a process worker, on a data folder that does not exist: its flow run."""
    url, env = prefect_server_running
    api_env = {**env, "PREFECT_API_URL": f"{url}/api", "PWD": str(PROJECT)}

    def prefect(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "prefect", *args],
            cwd=PROJECT,
            env=api_env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    for command in (
        ("work-pool", "create", "headstart", "--type", "process"),
        ("work-queue", "create", "training", "--pool", "headstart", "--limit", "1"),
        ("deploy", "--all"),
    ):
        assert (done := prefect(*command)).returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # Only the run below is the worker's: no schedule starts another meanwhile.
    for deployment in _api(url, "/deployments/filter", {}):
        for schedule in deployment["schedules"]:
            _api(url, f"/deployments/{deployment['id']}/schedules/{schedule['id']}", {"active": False}, "PATCH")
    worker_log = work / "worker.log"
    with process_worker(Path(env["PREFECT_HOME"]), f"{url}/api", "headstart", worker_log):
        places = [f"{name}={json.dumps(str(work / name))}" for name in ("artifacts_root", "cache_dir")]
        missing = json.dumps(str(work / "does-not-exist"))
        arguments = [item for value in (f"data={missing}", *places) for item in ("--param", value)]
        ran = prefect("deployment", "run", "train/train", *arguments, "--watch", "--watch-interval", "2")
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", ran.stdout)
    assert flow_run_id, ran.stdout[-3000:] + ran.stderr[-3000:] + worker_log.read_text()[-3000:]
    flow_run = _api(url, f"/flow_runs/{flow_run_id.group(1)}")
    assert flow_run["state"]["type"] == "FAILED", worker_log.read_text()[-3000:]
    return flow_run


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


def _chromium(playwright):
    return playwright.chromium.launch(
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


def _screenshot_path(request, tmp_path: Path, name: str) -> Path:
    """docs/NAME with --refresh-docs, else a temporary file."""
    return PROJECT / "docs" / name if request.config.getoption("--refresh-docs") else tmp_path / name


# What stretches an element wider than its box, from the element up to the page: a table the
# dashboard's pane can only show by scrolling sideways.
WIDER_THAN_THEIR_BOX = """element => {
    const wider = [];
    for (let node = element; node; node = node.parentElement) {
        if (node.scrollWidth > node.clientWidth) {
            wider.push(`${node.tagName}.${node.className}: ${node.scrollWidth} > ${node.clientWidth} px`);
        }
    }
    return wider;
}"""


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_the_dashboard_renders_the_report_the_gate_and_the_progress(trained_run, tmp_path, request):
    from playwright.sync_api import sync_playwright

    url, run_dir = trained_run
    flow_run = _api(url, "/flow_runs/filter", {"flows": {"name": {"any_": ["train"]}}})[0]
    artifacts = _api(url, "/artifacts/filter", {"flow_runs": {"id": {"any_": [flow_run["id"]]}}})
    by_key = {artifact["key"]: artifact for artifact in artifacts if artifact["key"]}
    progress = [artifact for artifact in artifacts if artifact["type"] == "progress"]
    with sync_playwright() as playwright:
        browser = _chromium(playwright)
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


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_the_dashboard_shows_a_kept_champion_the_champion_and_a_failure(
    prefect_server_running, kept_run, failed_run, tmp_path, request
):
    from playwright.sync_api import sync_playwright

    url, _ = prefect_server_running
    champion = _api(url, "/variables/name/headstart_champion")["value"]
    assert kept_run["state"]["message"].startswith(f"kept champion {champion['version']}: candidate ")
    gate = next(
        artifact
        for artifact in _api(url, "/artifacts/filter", {"flow_runs": {"id": {"any_": [kept_run["id"]]}}})
        if artifact["key"] == "headstart-gate"
    )
    with sync_playwright() as playwright:
        browser = _chromium(playwright)
        # A laptop's screen: the dashboard's side bar leaves the artifact pane about 1 000 px.
        page = browser.new_page(viewport={"width": 1280, "height": 900})

        page.goto(f"{url}/runs/flow-run/{kept_run['id']}", wait_until="networkidle", timeout=120_000)
        page.get_by_text("Details", exact=True).first.click()
        state_message = page.get_by_text("State Message", exact=True).locator("xpath=..")
        state_message.wait_for(state="visible", timeout=60_000)
        assert f"kept champion {champion['version']}: candidate" in state_message.inner_text()

        page.goto(f"{url}/artifacts/artifact/{gate['id']}", wait_until="networkidle", timeout=120_000)
        table = page.locator("table").first
        table.wait_for(state="visible", timeout=60_000)
        assert "keep the champion" in table.inner_text() and "drift: new_images" in table.inner_text()
        assert table.evaluate(WIDER_THAN_THEIR_BOX) == []
        page.get_by_text("drift:", exact=False).first.wait_for(state="visible", timeout=60_000)
        page.screenshot(path=str(tmp_path / "gate-kept.png"), full_page=True)

        (latest,) = _api(
            url,
            "/artifacts/filter",
            {"artifacts": {"key": {"any_": ["headstart-champion"]}}, "sort": "CREATED_DESC", "limit": 1},
        )
        page.goto(f"{url}/artifacts/artifact/{latest['id']}", wait_until="networkidle", timeout=120_000)
        page.get_by_text(f"headstart run {champion['version']}", exact=False).first.wait_for(
            state="visible", timeout=60_000
        )
        page.screenshot(path=str(_screenshot_path(request, tmp_path, "dashboard-champion.png")))

        page.goto(f"{url}/variables", wait_until="networkidle", timeout=120_000)
        page.get_by_text("headstart_champion").first.wait_for(state="visible", timeout=60_000)
        page.get_by_text("click to view").first.click()
        page.get_by_role("button", name="Format").click()
        page.get_by_text(f'"run_dir": "{champion["run_dir"]}"').first.wait_for(state="visible", timeout=60_000)
        page.screenshot(path=str(_screenshot_path(request, tmp_path, "dashboard-champion-variable.png")))

        # Tall enough for the whole log of a run that failed in one line.
        page.set_viewport_size({"width": 1280, "height": 1100})
        page.goto(f"{url}/runs/flow-run/{failed_run['id']}", wait_until="networkidle", timeout=120_000)
        reason = "data folder not found"
        page.get_by_text(reason, exact=False).first.wait_for(state="visible", timeout=60_000)
        logs = page.inner_text("body")
        assert logs.count("\nERROR\n") == 1 and f"\nERROR\n{reason}" in logs and "Traceback" not in logs
        page.screenshot(path=str(_screenshot_path(request, tmp_path, "dashboard-failed-run.png")))
        browser.close()
