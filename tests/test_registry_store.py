"""The registry on an object store (headstart.registry.published): runs published with their
marker last, read on another machine from its own copy, the champion switched by conditional
writes, a writer killed halfway leaving nothing visible. moto's server for most tests, SeaweedFS
where a real server's conditional writes and a killed upload matter."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from headstart.errors import HeadstartError
from headstart.infra.object_store import ObjectStore, local_copy
from headstart.registry import published
from headstart.registry import versions as registry
from headstart.registry.run_writer import RunWriter
from headstart.registry.runs import METRICS_FILE
from tests.object_stores import make_bucket, seaweed_server, seaweed_unavailable, use_store
from tests.test_registry import _run_dir

PROJECT = Path(__file__).resolve().parents[1]


def _publish(root: str, accuracy: float) -> str:
    """A complete run (models as stand-ins: the registry never loads them) written and published
    through RunWriter; its version."""
    with RunWriter(root) as writer:
        _run_dir(writer.staging.parent, writer.staging.name, accuracy)
    return writer.name


def _other_machine(monkeypatch, tmp_path, name: str) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / name))


def test_a_published_run_is_listed_and_read_on_another_machine(s3_bucket, monkeypatch, tmp_path):
    root = f"{s3_bucket}/runs"
    first, second = _publish(root, 0.81), _publish(root, 0.84)
    assert ObjectStore(root).exists(f"{first}/{published.MARKER}")
    _other_machine(monkeypatch, tmp_path, "machine-b")
    assert not local_copy(root).exists()

    rows = registry.versions(root)
    # Two runs written within one second are ordered by their random suffix, not by age.
    accuracy = {first: 0.81, second: 0.84}
    newest = sorted(accuracy, reverse=True)
    assert [row.version for row in rows] == newest
    assert [row.accuracy for row in rows] == [accuracy[name] for name in newest]
    assert rows[0].path == f"{root}/{newest[0]}"
    assert not local_copy(root).exists()  # a listing reads markers only

    registry.promote(root, first, "first")
    run = registry.champion(root)
    assert run.path == local_copy(root) / first and run.metrics["accuracy"] == 0.81
    assert registry.resolve(root, f"{root}/{second}").metrics["accuracy"] == 0.84
    assert [row.champion for row in registry.versions(root)] == [name == first for name in newest]


def test_a_version_without_its_marker_is_invisible_and_cannot_be_promoted(s3_bucket):
    root = f"{s3_bucket}/runs"
    version = _publish(root, 0.8)
    store = ObjectStore(root)
    store.write_bytes("20991231-000000-halfway/metrics.json", b"{}")
    assert [row.version for row in registry.versions(root)] == [version]
    with pytest.raises(HeadstartError, match="not a complete run"):
        registry.promote(root, "20991231-000000-halfway", "no")


def test_promote_and_rollback_keep_the_whole_history_on_the_store(s3_bucket):
    root = f"{s3_bucket}/runs"
    a, b = _publish(root, 0.8), _publish(root, 0.85)
    registry.promote(root, a, "first")
    with pytest.raises(registry.ChampionChanged):
        registry.promote(root, b, "decided against none", expected_champion=None)
    registry.promote(root, b, "better", expected_champion=a)
    registry.rollback(root, "worse in use")
    assert registry.champion_version(root) == a
    assert [(e["version"], e["rollback"]) for e in registry.history(root)] == [(a, False), (b, False), (a, True)]
    alias = json.loads(ObjectStore(root).read_bytes(published.ALIAS))
    assert alias["version"] == a and len(alias["history"]) == 3


def test_a_run_changed_after_publishing_reaches_other_machines(s3_bucket, monkeypatch, tmp_path):
    root = f"{s3_bucket}/runs"
    version = _publish(root, 0.8)
    _other_machine(monkeypatch, tmp_path, "machine-b")
    assert "exported" not in registry.resolve(root, version).metrics  # B's copy, as published first
    _other_machine(monkeypatch, tmp_path, "machine-a")
    registry.resolve(root, version).update_metrics(lambda metrics: {**metrics, "exported": True})
    _other_machine(monkeypatch, tmp_path, "machine-b")
    assert registry.resolve(root, version).metrics["exported"] is True


def test_a_damaged_alias_on_the_store_is_one_line(s3_bucket):
    root = f"{s3_bucket}/runs"
    ObjectStore(root).write_bytes(published.ALIAS, b"{not json")
    with pytest.raises(HeadstartError, match="champion alias s3://.*champion.json is not valid JSON"):
        registry.champion_version(root)


# --- a real S3-compatible server --------------------------------------------------------------


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory):
    reason = seaweed_unavailable()
    if reason:
        pytest.skip(reason)
    with seaweed_server(tmp_path_factory.mktemp("seaweed")) as endpoint:
        yield endpoint


@pytest.fixture
def seaweed_root(seaweed, monkeypatch, tmp_path, request) -> str:
    use_store(monkeypatch, seaweed)
    _other_machine(monkeypatch, tmp_path, "machine-a")
    bucket = make_bucket(seaweed, request.node.name.replace("_", "-")[:40].strip("-"))
    return f"{bucket}/runs"


def _script_env(tmp_path: Path, name: str) -> dict:
    return {**os.environ, "XDG_CACHE_HOME": str(tmp_path / name), "PYTHONPATH": str(PROJECT)}


@pytest.mark.e2e
def test_two_machines_promoting_at_once_leave_one_champion_and_every_entry(seaweed_root, tmp_path):
    versions = [_publish(seaweed_root, 0.8), _publish(seaweed_root, 0.9)]
    script = (
        "import sys; from headstart.registry import versions as registry\n"
        "for i in range(10): registry.promote(sys.argv[1], sys.argv[2], f'{sys.argv[2]} {i}')"
    )
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", script, seaweed_root, version], cwd=PROJECT, env=_script_env(tmp_path, f"m{i}")
        )
        for i, version in enumerate(versions)
    ]
    assert [writer.wait(timeout=300) for writer in writers] == [0, 0]
    entries = registry.history(seaweed_root)
    assert {entry["reason"] for entry in entries} == {f"{v} {i}" for v in versions for i in range(10)}
    assert len(entries) == 20 and registry.champion_version(seaweed_root) == entries[-1]["version"]
    # Each entry names the champion it replaced: none was lost between two writers.
    assert [entry["previous"] for entry in entries[1:]] == [entry["version"] for entry in entries[:-1]]


@pytest.mark.e2e
def test_a_writer_killed_while_publishing_leaves_no_visible_run(seaweed_root, tmp_path):
    standing = _publish(seaweed_root, 0.8)
    halfway = tmp_path / "halfway"
    # The writer uploads its owner record and two files, says so, and waits to be killed.
    script = f"""
import sys, time
from pathlib import Path
from headstart.infra.object_store import ObjectStore
from headstart.registry.run_writer import RunWriter
from tests.test_registry import _run_dir
uploads = 0
real_upload = ObjectStore.upload
def upload(self, source, name):
    global uploads
    real_upload(self, source, name)
    uploads += 1
    if uploads == 2:
        Path({str(halfway)!r}).write_text(name.split("/")[0])
        time.sleep(600)
ObjectStore.upload = upload
with RunWriter(sys.argv[1]) as writer:
    _run_dir(writer.staging.parent, writer.staging.name, 0.99)
"""
    writer = subprocess.Popen(
        [sys.executable, "-c", script, seaweed_root], cwd=PROJECT, env=_script_env(tmp_path, "machine-k")
    )
    try:
        deadline = time.monotonic() + 240
        while not halfway.exists() and writer.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert halfway.exists(), "the writer never reached the middle of its upload"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=60)
    killed = halfway.read_text()
    store = ObjectStore(seaweed_root)
    assert killed in store.children() and not store.exists(f"{killed}/{published.MARKER}")
    assert [row.version for row in registry.versions(seaweed_root)] == [standing]
    with pytest.raises(HeadstartError, match="not a complete run"):
        registry.promote(seaweed_root, killed, "half a run")

    # The next writer on this host finds its owner dead and removes what it left.
    later = _publish(seaweed_root, 0.85)
    assert store.listing(killed) == {}
    assert [row.version for row in registry.versions(seaweed_root)] == [later, standing]
    assert (local_copy(seaweed_root) / later / METRICS_FILE).is_file()
