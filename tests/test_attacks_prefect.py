"""Attacks on the Prefect server `train` reports to: configured but not answering, a PREFECT_HOME
that cannot be written with no server running, a server killed in the middle of a run. Each ends
in one line: either before any work (exit 2, what to do), or, with --no-prefect, a run reported
nowhere; a server lost mid-run never hides the run directory that was committed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_class_images
from misbehaving_http import MisbehavingServer
from servers import PROJECT, free_port, prefect_env, prefect_server

# Imported here, under pytest's own capture: loaded for the first time under capsys, a module of
# the flow's keeps the stream of that test, and pytest later finds its capture file closed.
import flows.train  # noqa: E402, F401


@pytest.fixture
def data(tmp_path) -> Path:
    return write_class_images(tmp_path / "data", {"red": (200, 40, 40), "blue": (40, 40, 200)}, per_class=24)


def _train_args(data: Path, backbone: Path, work: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--data",
        str(data),
        "--backbone",
        str(backbone),
        "--image-size",
        "32",
        # As tests/test_flow.py: few images converge with a high learning rate, so the gate promotes.
        "--epochs",
        "40",
        "--learning-rate",
        "0.1",
        "--batch-size",
        "8",
        "--patience",
        "40",
        "--test-fraction",
        "0.25",
        "--artifacts-root",
        str(work / "artifacts"),
        "--cache-dir",
        str(work / "cache"),
        *extra,
    ]


def _one_error(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("headstart: error:")]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


def _train_in_process(capsys, args: list[str], settings: dict) -> tuple[int, str, str, float]:
    """`headstart train` through flows.cli.main, with Prefect settings as a user's environment
    would set them; returns the exit code, stdout, stderr and the seconds it took."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.cli import main

    capsys.readouterr()
    started = time.monotonic()
    with temporary_settings(settings, restore_defaults=set() if PREFECT_API_URL in settings else {PREFECT_API_URL}):
        code = main(args)
    seconds = time.monotonic() - started
    captured = capsys.readouterr()
    return code, captured.out, captured.err, seconds


@pytest.mark.parametrize("fault", ["dead port", "http 500", "no answer"])
def test_prefect_api_url_at_a_dead_port_or_a_failing_server_stops_before_any_work(
    fault, data, tiny_backbone_dir, tmp_path, capsys
):
    """Prefect unreachable: `PREFECT_API_URL` at a dead port, or at a server answering 500 (or not
    answering at all): one line naming the URL and what to do, exit 2, in seconds, before any
    work (no cache, no run), and one health check rather than a retry storm."""
    from prefect.settings import PREFECT_API_URL

    server = None if fault == "dead port" else MisbehavingServer(b"", "timeout" if fault == "no answer" else fault)
    url = f"http://127.0.0.1:{free_port()}/api" if server is None else server.url("api")
    try:
        code, out, err, seconds = _train_in_process(
            capsys, _train_args(data, tiny_backbone_dir, tmp_path), {PREFECT_API_URL: url}
        )
    finally:
        if server is not None:
            server.stop()
    error = _one_error(err)
    assert code == 2 and out == "", (code, out, err)
    assert f"no working Prefect API at {url}" in error and "--no-prefect" in error
    reason = {"dead port": "connection refused", "http 500": "HTTP 500", "no answer": "no answer within"}[fault]
    assert reason in error
    assert seconds < 15
    if server is not None:
        assert server.hits == 1
    assert not (tmp_path / "cache").exists() and not (tmp_path / "artifacts").exists()


@pytest.fixture(params=["under a regular file", "on a read-only file system"])
def unwritable_home(request, tmp_path) -> Path:
    """A PREFECT_HOME that cannot be created or written, even by root."""
    if request.param == "under a regular file":
        (tmp_path / "a-file").write_text("")
        yield tmp_path / "a-file" / "prefect"
        return
    mount = tmp_path / "read-only"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a read-only tmpfs needs root")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("mount -t tmpfs failed here")
    try:
        yield mount / "prefect"
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_an_unwritable_prefect_home_with_no_server_stops_in_one_line(
    unwritable_home, data, tiny_backbone_dir, tmp_path, capsys
):
    """Prefect unreachable: a read-only HOME (PREFECT_HOME unwritable) and no server: one line
    naming PREFECT_HOME and what to do, exit 2, in seconds (not minutes of a temporary server
    timing out), before any work."""
    from prefect.settings import PREFECT_HOME, PREFECT_SERVER_API_PORT

    settings = {PREFECT_HOME: unwritable_home, PREFECT_SERVER_API_PORT: free_port()}  # no local server there
    code, out, err, seconds = _train_in_process(capsys, _train_args(data, tiny_backbone_dir, tmp_path), settings)
    error = _one_error(err)
    assert code == 2 and out == "", (code, out, err)
    assert f"Prefect cannot write its home folder for a temporary one ({unwritable_home}" in error
    assert "set PREFECT_HOME to a writable folder" in error
    assert "--no-prefect" in error
    assert seconds < 15
    assert not (tmp_path / "cache").exists() and not (tmp_path / "artifacts").exists()


def test_no_prefect_trains_without_reporting_when_neither_server_nor_home_works(data, tiny_backbone_dir, tmp_path):
    """Prefect unreachable, with --no-prefect: `PREFECT_API_URL` at a dead port and an unwritable
    PREFECT_HOME, in a real process: the run completes, says it is not reported, prints its run
    directory, and leaves no trace of the temporary server it reported to."""
    (tmp_path / "a-file").write_text("")
    home = tmp_path / "a-file" / "prefect"
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    env = prefect_env(home, f"http://127.0.0.1:{free_port()}/api", TMPDIR=str(temporary))
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", *_train_args(data, tiny_backbone_dir, tmp_path, "--no-prefect")],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "headstart: error" not in result.stderr
    assert "--no-prefect: this run is not reported to any Prefect server" in result.stderr
    run_dir = Path(result.stdout.strip().splitlines()[-1])
    assert run_dir.parent == tmp_path / "artifacts" and (run_dir / "metrics.json").is_file()
    assert list(temporary.iterdir()) == []


# Where the server is killed: (a line of the run's log, --no-gate or not).
KILLED = {
    "after the run directory is committed, the gate promoting": ("Task run 'visualize-", ()),
    "after the run directory is committed, gate off": ("Task run 'visualize-", ("--no-gate",)),
    "as the flow begins": ("Beginning flow run", ()),
}


@pytest.mark.e2e
@pytest.mark.parametrize("when", list(KILLED))
def test_a_server_killed_mid_run_never_hides_the_committed_run(when, data, tiny_backbone_dir, tmp_path):
    """Prefect unreachable: a server killed mid-run. Only reports are lost (they are best-effort):
    the work goes on, the gate's promotion included; the committed run directory is printed last
    (stdout), complete; exit 0 and one line that says what was lost. In seconds, never a traceback."""
    from headstart.registry import versions as registry
    from headstart.registry.runs import Run

    marker, extra = KILLED[when]
    home = tmp_path / "prefect"
    home.mkdir()
    started: list[subprocess.Popen] = []
    with prefect_server(home, started=started) as url:
        (server,) = started
        log = tmp_path / "train.err"
        with open(log, "w") as stderr:
            train = subprocess.Popen(
                [sys.executable, "-m", "flows.cli", *_train_args(data, tiny_backbone_dir, tmp_path, *extra)],
                cwd=PROJECT,
                env=prefect_env(home, f"{url}/api"),
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
            try:
                while marker not in log.read_text() and train.poll() is None:
                    time.sleep(0.02)
                os.killpg(server.pid, signal.SIGKILL)
                killed = time.monotonic()
                out, _ = train.communicate(timeout=300)
            finally:
                if train.poll() is None:
                    train.kill()
        after_kill = time.monotonic() - killed
    err = log.read_text()
    assert "Traceback" not in err, err[-3000:]
    assert after_kill < 60, f"{after_kill:.0f} s after the server died"
    lost = f"the Prefect server at {url}/api stopped answering during the run"
    artifacts = tmp_path / "artifacts"
    run_dir = Path(out.strip().splitlines()[-1])
    assert run_dir.parent == artifacts and Run.if_complete(run_dir) is not None
    assert train.returncode == 0 and "headstart: error" not in err
    (warning,) = [line for line in err.splitlines() if line.startswith("headstart: warning:")]
    assert lost in warning and "the run is complete; its last reports to Prefect were lost" in warning
    if not extra:
        assert Run(run_dir).lineage.gate["promote"], "the gate was to promote this run"
        assert registry.champion_version(artifacts) == run_dir.name
