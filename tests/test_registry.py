"""The model registry: versions, the champion alias and its atomic switch, promote and rollback."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from headstart.errors import HeadstartError
from headstart.registry import versions as registry
from headstart.registry.runs import CLASS_NAMES_FILE, CONFIG_FILE, LINEAGE_FILE, METRICS_FILE, RUN_FILES

PROJECT = Path(__file__).resolve().parents[1]


def _run_dir(root: Path, name: str, accuracy: float, classes=("cat", "dog")) -> Path:
    """A run directory with every file a complete run holds (models as empty stand-ins: the
    registry never loads them)."""
    run = root / name
    for entry in RUN_FILES:
        if "." in entry:
            (run / entry).parent.mkdir(parents=True, exist_ok=True)
            (run / entry).write_text("{}")
        else:
            (run / entry).mkdir(parents=True, exist_ok=True)
    (run / CLASS_NAMES_FILE).write_text(json.dumps(list(classes)))
    (run / METRICS_FILE).write_text(
        json.dumps({"accuracy": accuracy, "n": 100, "macro_f1": accuracy, "class_names": list(classes)})
    )
    (run / CONFIG_FILE).write_text(json.dumps({"image_size": 32}))
    (run / LINEAGE_FILE).write_text(json.dumps(_first_lineage(name, accuracy, list(classes))))
    return run


def _first_lineage(name: str, accuracy: float, classes: list[str]) -> dict:
    """A lineage record as the first runs that kept one wrote it: before the gate's decision and the
    feature reference."""
    return {
        "version": name,
        "created_at": f"{name[:4]}-12-01T00:00:00+00:00",
        "headstart": "0.1.0",
        "flow_run_id": None,
        "data": {"source": "photos", "splits": {"test": {"images": 100, "content_sha256": "0" * 64}}},
        "class_names": classes,
        "backbone": {"handle": "bundled:mobilenet_v2_100", "fingerprint": "0123456789abcdef", "image_size": 32},
        "parameters": {"image_size": 32},
        "training_key": "k" * 20,
        "metrics": {"accuracy": accuracy, "n": 100, "macro_f1": accuracy},
    }


@pytest.fixture
def root(tmp_path) -> Path:
    root = tmp_path / "artifacts"
    for index, accuracy in enumerate((0.81, 0.84, 0.79)):
        _run_dir(root, f"2026120{index + 1}-030000-00000{index}", accuracy)
    (root / ".20261204-030000-abcdef.partial").mkdir()  # a run being written: not a version
    _run_dir(root, "20261205-030000-broken", 0.9)
    (root / "20261205-030000-broken" / METRICS_FILE).rename(
        root / "20261205-030000-broken" / "moved.json"
    )  # incomplete
    return root


def test_versions_are_the_complete_runs_newest_first(root):
    rows = registry.versions(root)
    assert [row.version for row in rows] == [
        "20261203-030000-000002",
        "20261202-030000-000001",
        "20261201-030000-000000",
    ]
    assert [row.accuracy for row in rows] == [0.79, 0.84, 0.81]
    assert not any(row.champion for row in rows) and registry.champion(root) is None


def test_promote_and_rollback_walk_the_champions_history(root):
    first, second, third = "20261201-030000-000000", "20261202-030000-000001", "20261203-030000-000002"
    registry.promote(root, first, "first model")
    registry.promote(root, second, "better")
    registry.promote(root, third, "by hand")
    assert registry.champion_version(root) == third
    assert [row.version for row in registry.versions(root) if row.champion] == [third]
    assert registry.rollback(root)["version"] == second
    assert registry.rollback(root, "still worse")["version"] == first  # a second rollback goes further back
    with pytest.raises(HeadstartError, match="no earlier champion"):
        registry.rollback(root)
    assert [(entry["version"], entry["previous"], entry["rollback"]) for entry in registry.history(root)] == [
        (first, None, False),
        (second, first, False),
        (third, second, False),
        (second, third, True),
        (first, second, True),
    ]
    assert registry.history(root)[-1]["reason"] == "still worse"
    assert registry.resolve(root, "champion").path == root / first


@pytest.mark.parametrize("version", ["20261205-030000-broken", ".20261204-030000-abcdef.partial", "nowhere"])
def test_the_alias_never_names_a_missing_or_partial_run(root, version):
    registry.promote(root, "20261201-030000-000000", "first")
    with pytest.raises(HeadstartError, match="not a complete run"):
        registry.promote(root, version, "mistake")
    assert registry.champion_version(root) == "20261201-030000-000000"


def test_a_crash_between_writing_and_renaming_leaves_the_old_champion(root, monkeypatch):
    registry.promote(root, "20261201-030000-000000", "first")

    def crash(source, destination):
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        registry.promote(root, "20261202-030000-000001", "second")
    monkeypatch.undo()
    assert registry.champion_version(root) == "20261201-030000-000000"
    assert len(registry.history(root)) == 1
    assert sorted(path.name for path in registry.alias_path(root).parent.iterdir()) == [
        "champion.json",
        "champion.lock",
    ]  # no temporary file left


def _headstart(*args):
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], cwd=PROJECT, capture_output=True, text=True, timeout=120
    )


def test_models_command_lists_promotes_and_rolls_back(root):
    promoted = _headstart("models", "promote", "20261202-030000-000001", "--artifacts-root", str(root))
    assert promoted.returncode == 0, promoted.stderr
    listed = json.loads(_headstart("models", "--artifacts-root", str(root), "--json").stdout)
    assert [(row["version"], row["accuracy"], row["champion"]) for row in listed] == [
        ("20261203-030000-000002", 0.79, False),
        ("20261202-030000-000001", 0.84, True),
        ("20261201-030000-000000", 0.81, False),
    ]
    assert all(Path(row["path"]).is_dir() for row in listed)
    text = _headstart("models", "--artifacts-root", str(root)).stdout
    assert "* 20261202-030000-000001" in text
    failed = _headstart("models", "--artifacts-root", str(root), "rollback")
    assert (
        failed.returncode == 2
        and failed.stderr.startswith("headstart: error: there is no earlier champion")
        and "Traceback" not in failed.stderr
    )
    missing = _headstart("models", "promote", "nope", "--artifacts-root", str(root))
    assert missing.returncode == 2 and "not a complete run" in missing.stderr


def test_promotions_from_processes_at_once_lose_no_history_entry(root):
    script = (
        "import sys; from pathlib import Path; from headstart.registry import versions as registry\n"
        "for i in range(25): registry.promote(Path(sys.argv[1]), sys.argv[2], f'{sys.argv[2]} {i}')"
    )
    versions = ["20261201-030000-000000", "20261202-030000-000001"]
    writers = [
        subprocess.Popen([sys.executable, "-c", script, str(root), version], cwd=PROJECT) for version in versions
    ]
    assert [writer.wait(timeout=120) for writer in writers] == [0, 0]
    entries = registry.history(root)
    assert len(entries) == 50 and {entry["reason"] for entry in entries} == {
        f"{v} {i}" for v in versions for i in range(25)
    }
    assert registry.champion_version(root) == entries[-1]["version"]
