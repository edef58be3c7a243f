"""Kills: `headstart train` killed with SIGKILL while it extracts features, while it trains the
head and while it writes the run. The next run completes and reuses every finished cache shard;
the artifacts root then holds no partial run, and the champion is a complete version."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import write_class_images
from servers import PROJECT, prefect_env, prefect_server


def test_a_staging_directory_is_removed_only_once_its_writer_is_dead(tmp_path):
    from headstart.registry.run_writer import OWNER_FILE, remove_abandoned_staging

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    owners = {
        ".a.partial": f"{socket.gethostname()} {dead}",
        ".b.partial": f"{socket.gethostname()} {os.getpid()}",
        ".c.partial": None,
        ".d.partial": f"another-host {dead}",
    }
    for name, owner in owners.items():
        (tmp_path / name).mkdir()
        if owner:
            (tmp_path / name / OWNER_FILE).write_text(owner)
    assert remove_abandoned_staging(tmp_path) == [tmp_path / ".a.partial"]
    assert sorted(path.name for path in tmp_path.iterdir()) == [".b.partial", ".c.partial", ".d.partial"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    with prefect_server(home) as url:
        yield prefect_env(home, f"{url}/api")


def _train(env, data: Path, work: Path, cache: Path, *extra: str) -> subprocess.Popen:
    """`headstart train` in the background, its output in files (a pipe nobody reads could stall it)."""
    work.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "flows.cli",
        "train",
        "--data",
        str(data),
        "--image-size",
        "96",
        "--engine",
        "keras",
        "--extraction-shard-size",
        "16",
        "--artifacts-root",
        str(work / "artifacts"),
        "--cache-dir",
        str(cache),
        *extra,
    ]
    with open(work / "stdout.txt", "w") as stdout, open(work / "stderr.txt", "w") as stderr:
        return subprocess.Popen(command, cwd=PROJECT, env=env, stdout=stdout, stderr=stderr)


def _kill_when(process: subprocess.Popen, condition, work: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, (
            f"the run ended before the moment to kill it: {(work / 'stderr.txt').read_text()[-3000:]}"
        )
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()


def _shards(cache: Path) -> list[Path]:
    return sorted((cache / "features").glob("*/shard-*.parquet"))


@pytest.mark.e2e
@pytest.mark.parametrize("moment", ["extracting features", "training the head", "writing the run"])
def test_a_run_killed_midway_leaves_nothing_partial_and_the_next_one_completes(moment, server, tmp_path):
    data = write_class_images(tmp_path / "data", {"day": (230, 200, 40), "night": (20, 30, 90)}, per_class=60)
    work, cache = tmp_path / "work", tmp_path / "cache"
    # A champion first, from a cache of its own, so that the kill meets a registry in use and the
    # killed run has every feature to extract.
    assert _train(server, data, work, tmp_path / "first-cache").wait() == 0
    if moment == "extracting features":
        killed = _train(server, data, work, cache)
        _kill_when(killed, lambda: len(_shards(cache)) >= 2, work)
    elif moment == "training the head":  # many epochs, none stopping early: the kill lands inside train_head
        killed = _train(server, data, work, cache, "--epochs", "1000", "--patience", "1000")
        log = work / "stderr.txt"
        _kill_when(killed, lambda: "Task run 'build_model" in log.read_text() and time.sleep(0.5) is None, work)
        assert "Task run 'train_head" not in log.read_text()  # killed before train_head finished
    else:
        killed = _train(server, data, work, cache)
        _kill_when(killed, lambda: any((work / "artifacts").glob(".*.partial/saved_model")), work)
    features_left = sum(pq.read_metadata(shard).num_rows for shard in _shards(cache))

    again = _train(server, data, work, cache)
    assert again.wait(timeout=600) == 0, (work / "stderr.txt").read_text()[-3000:]
    run = Path((work / "stdout.txt").read_text().strip().splitlines()[-1])
    metrics = json.loads((run / "metrics.json").read_text())
    assert (
        metrics["features_reused"] == features_left
        and metrics["features_reused"] + metrics["features_extracted"] == 120
    )
    assert [path.name for path in (work / "artifacts").glob(".*")] == []  # no staging directory left behind
    versions = json.loads(
        subprocess.run(
            [sys.executable, "-m", "flows.cli", "models", "--json", "--artifacts-root", str(work / "artifacts")],
            cwd=PROJECT,
            env=server,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert [version["path"] for version in versions if version["champion"]] == [str(run)]
    assert len(versions) == 2  # the first run and this one: the killed run left no version


@pytest.mark.e2e
def test_two_runs_started_at_once_on_one_cache_and_registry_both_finish_correctly(server, tmp_path):
    data = write_class_images(tmp_path / "data", {"day": (230, 200, 40), "night": (20, 30, 90)}, per_class=60)
    cache = tmp_path / "cache"
    runs = [
        _train(server, data, tmp_path / name, cache, "--artifacts-root", str(tmp_path / "artifacts"))
        for name in ("one", "two")
    ]
    assert [run.wait(timeout=600) for run in runs] == [0, 0], [
        (tmp_path / name / "stderr.txt").read_text()[-2000:] for name in ("one", "two")
    ]
    run_dirs = [Path((tmp_path / name / "stdout.txt").read_text().strip().splitlines()[-1]) for name in ("one", "two")]
    metrics = [json.loads((run / "metrics.json").read_text()) for run in run_dirs]
    assert [m["accuracy"] for m in metrics] == [1.0, 1.0] and metrics[0]["confusion_matrix"] == metrics[1][
        "confusion_matrix"
    ]
    stored = [pq.read_table(shard) for shard in _shards(cache)]  # every shard reads back whole
    assert (
        sorted(sha for table in stored for sha in table.column("sha256").to_pylist())
        == sorted(set(sha for table in stored for sha in table.column("sha256").to_pylist()))
        and sum(t.num_rows for t in stored) == 120
    )
    versions = json.loads(
        subprocess.run(
            [sys.executable, "-m", "flows.cli", "models", "--json", "--artifacts-root", str(tmp_path / "artifacts")],
            cwd=PROJECT,
            env=server,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert sorted(v["path"] for v in versions) == sorted(map(str, run_dirs))
    assert sum(v["champion"] for v in versions) == 1
