"""Store URLs as places: checked before any work in one line, kept intact by the CLI, predictions
and Prefect's results kept in the store (moto's server)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from headstart.errors import HeadstartError
from headstart.infra.object_store import ObjectStore, check_place, local_copy
from headstart.serving.predict import default_output, keep_in_store
from tests.object_stores import use_store
from tests.servers import free_port
from tests.test_registry_store import _publish

PROJECT = Path(__file__).resolve().parents[1]


def _headstart(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "PYTHONPATH": str(PROJECT)},
    )


def test_a_missing_bucket_stops_train_in_one_line_before_any_work(s3_bucket, colour_folder):
    done = _headstart("train", "--data", str(colour_folder), "--artifacts-root", "s3://no-such-bucket/runs")
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (
        "headstart: error: --artifacts-root s3://no-such-bucket/runs: there is no bucket no-such-bucket; "
        "create it, or choose another"
    )


def test_a_store_that_does_not_answer_is_one_line(monkeypatch, tmp_path, colour_folder):
    use_store(monkeypatch, f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(HeadstartError, match=r"^--cache-dir s3://team/cache: the store does not answer \("):
        check_place("s3://team/cache", "--cache-dir")
    done = _headstart("train", "--data", str(colour_folder), "--cache-dir", "s3://team/cache")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("headstart: error: --cache-dir s3://team/cache: the store does not answer")


def test_a_store_place_is_checked_with_this_machines_copy(s3_bucket):
    check_place(f"{s3_bucket}/runs", "--artifacts-root")
    copy = local_copy(f"{s3_bucket}/runs")
    copy.parent.mkdir(parents=True)
    copy.write_text("a file where the copy goes")
    with pytest.raises(HeadstartError, match="is not a folder"):
        check_place(f"{s3_bucket}/runs", "--artifacts-root")


def test_models_lists_a_registry_on_a_store(s3_bucket):
    root = f"{s3_bucket}/runs"
    version = _publish(root, 0.83)
    promoted = _headstart("models", "promote", version, "--artifacts-root", root)
    assert promoted.returncode == 0, promoted.stderr
    listed = _headstart("models", "--json", "--artifacts-root", root)
    assert listed.returncode == 0, listed.stderr
    assert version in listed.stdout and f"{root}/{version}" in listed.stdout


def test_predictions_without_an_output_are_kept_in_the_store_once(s3_bucket):
    root = f"{s3_bucket}/runs"
    output = default_output(root, "happy-run")
    assert output.parent == local_copy(root) / "predictions"
    output.parent.mkdir(parents=True)
    output.write_text("path,label,probability\n")
    url = keep_in_store(root, output)
    assert url == f"{root}/predictions/{output.name}"
    assert ObjectStore(root).read_bytes(f"predictions/{output.name}") == b"path,label,probability\n"
    with pytest.raises(HeadstartError, match="already there"):
        keep_in_store(root, output)


def test_a_flow_run_keeps_its_results_in_the_store(s3_bucket, prefect_harness):
    from prefect import flow, task

    from flows.results import RESULTS_FOLDER, keep_results_in

    @task(persist_result=True)
    def double(value: int) -> int:
        return 2 * value

    @flow(persist_result=True)
    def counted(root: str) -> int:
        keep_results_in(root)
        return double(21)

    root = f"{s3_bucket}/runs"
    assert counted(root) == 42
    kept = ObjectStore(root).listing(RESULTS_FOLDER)
    assert len(kept) >= 2  # the task's result and the flow's
