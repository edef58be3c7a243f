"""Attacks on the registry: a promotion racing the gate, versions outside the root, a damaged
champion alias, a champion that is gone, damaged run metadata, and a train on a damaged registry.

Each ends in one `headstart: error:` line and exit 2 (or the stated behaviour), with no traceback
and the registry's files as they were."""

import json
import logging
import random
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import test_registry as registry_tests

from flows.cli import main
from headstart.errors import HeadstartError
from headstart.promotion import mcnemar
from headstart.promotion.decide import promote_as_decided
from headstart.registry import versions as registry
from headstart.registry.runs import CLASS_NAMES_FILE, CONFIG_FILE, LINEAGE_FILE, METRICS_FILE, Run

OLD, MIDDLE, NEW = "20261201-030000-000000", "20261202-030000-000001", "20261203-030000-000002"


@pytest.fixture
def root(tmp_path) -> Path:
    """Three complete versions, the first of them champion."""
    root = tmp_path / "artifacts"
    for name, accuracy in ((OLD, 0.81), (MIDDLE, 0.84), (NEW, 0.79)):
        registry_tests._run_dir(root, name, accuracy)
    registry.promote(root, OLD, "first model")
    return root


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root, by relative path (the lock file aside: taking the lock is not a change)."""
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.suffix != ".lock"
    }


def _one_error_line(capture, text: str | None = None) -> str:
    """The one error line a command wrote (capture: capsys, or capfd, or what either read)."""
    err = capture.err if hasattr(capture, "err") else capture.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("headstart: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    if text is not None:
        assert text in lines[0], lines[0]
    return lines[0]


def _decision_against(root: Path, accuracy: float = 0.9) -> mcnemar.GateDecision:
    """The gate's decision for a candidate that is better than the champion it reads now."""
    compared = registry.champion_version(root)
    candidate = np.arange(100) < accuracy * 100
    champion = np.arange(100) < 80
    return mcnemar.against_champion(candidate, champion, compared)


def test_race_promote_by_hand_during_the_gate_window(root, capsys):
    """A race in the gate: `models promote V` between the gate and its promote step.

    Twenty times, a promotion by hand lands at a random point of the window between the gate's
    decision and its promote step (or just after it): the champion is only ever replaced by the
    gate when it is the one the gate compared with."""
    outcomes = set()
    for attempt in range(20):
        rounds = random.Random(attempt)
        shutil.rmtree(root / "registry")
        registry.promote(root, OLD, "first model")
        decision = _decision_against(root)  # the gate: compared with OLD
        assert decision.promote and decision.champion == OLD
        window = 0.05
        landing = rounds.uniform(0, window * 1.5)  # a third land after the promote step
        by_hand = threading.Thread(
            target=lambda: (time.sleep(landing), main(["models", "promote", MIDDLE, "--artifacts-root", str(root)]))
        )
        by_hand.start()
        time.sleep(window)  # visualize, publish, export
        final = promote_as_decided(root, NEW, decision)
        by_hand.join()
        history = registry.history(root)
        by_gate = [entry for entry in history if entry["by"] == "gate"]
        if final.promote:
            outcomes.add("promoted")
            assert [entry["previous"] for entry in by_gate] == [decision.champion]
            assert final == decision
            # The promotion by hand came after: it replaced the gate's champion, which it names.
            assert history[-1]["version"] == MIDDLE and history[-1]["previous"] == NEW
        else:
            outcomes.add("left unpromoted")
            assert by_gate == []
            assert registry.champion_version(root) == MIDDLE and history[-1]["previous"] == OLD
            assert final.reason.startswith("not promoted: the gate compared it with champion " + OLD)
            assert MIDDLE in final.reason and decision.reason in final.notes[-1]
        for entry in by_gate:
            assert entry["previous"] == decision.champion
        capsys.readouterr()
    assert outcomes == {"promoted", "left unpromoted"}


def test_race_first_model_against_a_champion_promoted_meanwhile(root):
    """A race in the gate: the first model's gate (no champion) and a promotion by hand meanwhile."""
    shutil.rmtree(root / "registry")
    decision = mcnemar.first_model(np.ones(10, bool), np.arange(10) % 2)
    assert decision.promote and decision.champion is None
    registry.promote(root, MIDDLE, "by hand")
    before = _snapshot(root)
    final = promote_as_decided(root, NEW, decision)
    assert not final.promote and "no champion" in final.reason and MIDDLE in final.reason
    assert _snapshot(root) == before


@pytest.mark.parametrize(
    "version",
    ["outside", "../outside", "..", ".", "nested/run", ".hidden", "linked", "", "20261201-030000-000000/"],
)
def test_promote_a_path_outside_the_root(root, capsys, version):
    """`headstart models promote /abs/path/outside/the/root` is accepted."""
    outside = registry_tests._run_dir(root.parent, "outside", 0.99)
    registry_tests._run_dir(root / "nested", "run", 0.99)
    registry_tests._run_dir(root, ".hidden", 0.99)
    (root / "linked").symlink_to(outside)
    version = str(outside) if version == "outside" else version
    before = _snapshot(root)
    assert main(["models", "promote", version, "--artifacts-root", str(root)]) == 2
    _one_error_line(capsys, "not a complete run in")
    assert _snapshot(root) == before and registry.champion_version(root) == OLD


def test_an_outside_path_promoted_earlier_stays_history_and_is_never_rolled_back_to(root, capsys):
    """`headstart models promote /abs/path/outside/the/root` is accepted: an alias written back then."""
    outside = registry_tests._run_dir(root.parent, "outside", 0.99)
    entry = {"previous": None, "reason": "x", "by": "manual", "at": "t", "rollback": False}
    alias = {
        "version": MIDDLE,
        "history": [{**entry, "version": str(outside)}, {**entry, "version": MIDDLE, "previous": str(outside)}],
    }
    registry.alias_path(root).write_text(json.dumps(alias))
    assert main(["models", "--artifacts-root", str(root)]) == 0
    assert "* champion" in capsys.readouterr().out
    before = _snapshot(root)
    assert main(["models", "rollback", "--artifacts-root", str(root)]) == 2
    _one_error_line(capsys, "not a complete run in")
    assert _snapshot(root) == before


def test_resolve_takes_names_inside_the_root_and_explicit_run_directories(root):
    """`headstart models promote /abs/path/outside/the/root` is accepted: resolve's side."""
    (root / NEW / METRICS_FILE).unlink()  # an incomplete version is not a model to use
    with pytest.raises(HeadstartError, match=f"version {NEW} is not a complete run"):
        registry.resolve(root, NEW)
    assert registry.resolve(root, MIDDLE).path == root / MIDDLE
    # A run directory given as a path is the user asking for it.
    outside = registry_tests._run_dir(root.parent, "outside", 0.99)
    assert registry.resolve(root, str(outside)).path == outside


ALIASES = {
    "a list": "[]",
    "no version": '{"history": []}',
    "wrong types": '{"version": 123, "history": "x"}',
    "truncated": '{"version": "20261201-030000-000000", "hist',
    "not utf-8": b"\xff\xfe\x00garbage",
    "an outside path": json.dumps(
        {
            "version": "/elsewhere/run",
            "history": [{"version": "/elsewhere/run", "previous": None, "reason": "x", "by": "manual", "at": "t"}],
        }
    ),
    "version without history": '{"version": "20261201-030000-000000", "history": []}',
    "history without version": json.dumps(
        {"version": None, "history": [{"version": OLD, "previous": None, "reason": "x", "by": "manual", "at": "t"}]}
    ),
    "a bad entry": json.dumps({"version": OLD, "history": [{"version": OLD}]}),
}
COMMANDS = {
    "models": ["models"],
    "models --json": ["models", "--json"],
    "promote": ["models", "promote", MIDDLE],
    "rollback": ["models", "rollback"],
    "predict": ["predict", "IMAGE", "--model", "champion"],
    "export": ["export"],
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("alias", ALIASES)
def test_damaged_champion_alias(root, capsys, alias, command):
    """`champion.json` holding `[]`, `{"history": []}` or `{"version": 123, "history": "x"}` (and truncated)."""
    content = ALIASES[alias]
    path = registry.alias_path(root)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    image = root.parent / "image.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n")
    before = _snapshot(root)
    args = [str(image) if arg == "IMAGE" else arg for arg in COMMANDS[command]]
    assert main([*args, "--artifacts-root", str(root)]) == 2
    line = _one_error_line(capsys, f"the champion alias {path}")
    assert "restore it" in line
    assert _snapshot(root) == before


def _champion_gone(root):
    shutil.rmtree(root / OLD)


def _champion_incomplete(root):
    (root / OLD / METRICS_FILE).unlink()


def _champion_metrics_garbled(root):
    (root / OLD / METRICS_FILE).write_text('{"accuracy": 0.8')


def _champion_class_names_garbled(root):
    (root / OLD / CLASS_NAMES_FILE).write_text('{"cat": 0}')


@pytest.mark.parametrize(
    "damage", [_champion_gone, _champion_incomplete, _champion_metrics_garbled, _champion_class_names_garbled]
)
def test_models_with_an_unusable_champion(root, capsys, damage):
    """`models` prints "no champion yet" with exit 0 when the champion's directory is gone."""
    damage(root)
    before = _snapshot(root)
    assert main(["models", "--artifacts-root", str(root)]) == 2
    captured = capsys.readouterr()
    assert "no champion yet" not in captured.out and MIDDLE in captured.out  # the versions to choose from
    line = _one_error_line(captured, f"the champion {OLD}")
    assert "promote another version" in line
    assert _snapshot(root) == before
    # What the line says to do works.
    assert main(["models", "promote", MIDDLE, "--artifacts-root", str(root)]) == 0
    assert main(["models", "--artifacts-root", str(root)]) == 0


GARBLED = {
    "metrics truncated": (METRICS_FILE, '{"accuracy": 0.8', "metrics.json is not valid JSON"),
    "metrics a list": (METRICS_FILE, "[]", "metrics.json holds a JSON list"),
    "metrics accuracy text": (METRICS_FILE, '{"accuracy": "high", "n": 3}', "metrics.json holds no usable accuracy"),
    "lineage empty": (LINEAGE_FILE, "{}", "lineage.json is not a lineage record"),
    "lineage binary": (LINEAGE_FILE, b"\x00\xff\xfe", "lineage.json is not valid JSON"),
    "config a string": (CONFIG_FILE, '"x"', "config.json holds a JSON str"),
    "class names a dict": (CLASS_NAMES_FILE, '{"cat": 0}', "class_names.json holds a JSON dict"),
    "class names numbers": (CLASS_NAMES_FILE, "[1, 2]", "class_names.json does not hold a list of class names"),
}


@pytest.mark.parametrize("garbled", GARBLED)
def test_one_runs_garbled_metadata(root, capsys, garbled):
    """One run's garbled `metrics.json`: `headstart models` crashes, so no version can be listed."""
    name, content, reason = GARBLED[garbled]
    path = root / NEW / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    before = _snapshot(root)
    assert main(["models", "--artifacts-root", str(root)]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "error" not in captured.err
    lines = {
        line.split()[1] if line.startswith("*") else line.split()[0]: line for line in captured.out.splitlines()[1:4]
    }
    assert f"damaged: {reason}" in lines[NEW]
    assert "0.8100" in lines[OLD] and "0.8400" in lines[MIDDLE]
    assert main(["models", "--json", "--artifacts-root", str(root)]) == 0
    rows = {row["version"]: row for row in json.loads(capsys.readouterr().out)}
    assert reason in rows[NEW]["damaged"] and rows[MIDDLE]["damaged"] is None
    # The damaged version cannot be made champion, nor used by name.
    assert main(["models", "promote", NEW, "--artifacts-root", str(root)]) == 2
    _one_error_line(capsys, f"version {NEW} is damaged")
    assert main(["export", "--model", NEW, "--artifacts-root", str(root)]) == 2
    _one_error_line(capsys, str(path))
    assert _snapshot(root) == before


def _prefect_stream_handlers() -> set[logging.StreamHandler]:
    loggers = [logging.getLogger(), *map(logging.getLogger, list(logging.root.manager.loggerDict))]
    return {
        handler
        for logger in loggers
        for handler in logger.handlers
        if type(handler).__module__.startswith("prefect.") and isinstance(handler, logging.StreamHandler)
    }


def _write_prefect_logs_to(stream) -> None:
    for handler in _prefect_stream_handlers():
        handler.stream = stream
        if hasattr(handler, "console"):
            handler.console.file = stream


def _with_prefect_logs_captured(function, *args, **kwargs):
    """`function`'s result, with Prefect's log handlers writing to this test's captured stderr: they keep the
    stream they were set up with, which may be an earlier test's, closed since; afterwards they
    write to the process's own stderr, which no test closes."""
    _write_prefect_logs_to(sys.stderr)
    try:
        return function(*args, **kwargs)
    finally:
        _write_prefect_logs_to(sys.__stderr__)


@pytest.mark.parametrize("alias", ["truncated", "a list", "wrong types", "champion gone"])
def test_train_with_a_damaged_champion(prefect_harness, colour_folder, tmp_path, capsys, alias):
    """`train` with a truncated `champion.json` trains fully and only then fails at the gate."""
    root = tmp_path / "artifacts"
    registry_tests._run_dir(root, OLD, 0.8)
    registry.promote(root, OLD, "first model")
    if alias == "champion gone":
        shutil.rmtree(root / OLD)
        expected = f"the champion {OLD}"
    else:
        registry.alias_path(root).write_text(ALIASES[alias])
        expected = f"the champion alias {registry.alias_path(root)}"
    before = _snapshot(root)
    cache = tmp_path / "cache"
    args = ["train", "--data", str(colour_folder), "--artifacts-root", str(root), "--cache-dir", str(cache)]
    assert _with_prefect_logs_captured(main, args) == 2
    _one_error_line(capsys, expected)
    assert not cache.exists()  # no work was done: nothing was downloaded, scanned or extracted
    assert _snapshot(root) == before


class _Collected(logging.Handler):
    """The messages of the log records it is given."""

    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_race_promote_by_hand_during_a_trains_gate_window(
    prefect_harness, colour_folder, tiny_backbone_dir, tmp_path, monkeypatch
):
    """A race in the gate: `models promote V` during a real train's visualize + publish window.

    The train's output line, its gate table and its lineage record say the run was left
    unpromoted, and why."""
    from prefect.artifacts import Artifact

    import tasks.gate
    from flows.train import train
    from headstart.config import TrainConfig

    config = TrainConfig.smoke(
        data=str(colour_folder),
        backbone=str(tiny_backbone_dir),
        artifacts_root=tmp_path / "artifacts",
        cache_dir=tmp_path / "cache",
        epochs=40,
        learning_rate=0.1,
        batch_size=8,
        patience=40,
        test_fraction=0.25,
        gate_tolerance=1.0,
        gate_alpha=1e-9,
    )
    root = tmp_path / "artifacts"
    first = Path(train(**config.flat()))
    assert registry.champion_version(root) == first.name
    by_hand = "20990101-000000-byhand"
    shutil.copytree(first, root / by_hand)

    def promoted_by_hand_first(artifacts_root, version, decision):
        assert main(["models", "promote", by_hand, "--artifacts-root", str(root)]) == 0
        return promote_as_decided(artifacts_root, version, decision)

    monkeypatch.setattr(tasks.gate, "promote_as_decided", promoted_by_hand_first)
    logged = _Collected()
    logging.getLogger("prefect").addHandler(logged)
    try:
        second = Path(train(**config.with_options(seed=7).flat()))
    finally:
        logging.getLogger("prefect").removeHandler(logged)
    assert registry.champion_version(root) == by_hand
    assert [(entry["version"], entry["previous"], entry["by"]) for entry in registry.history(root)] == [
        (first.name, None, "gate"),
        (by_hand, first.name, "manual"),
    ]
    out = "\n".join(logged.messages)
    assert f"gate: not promoted: the gate compared it with champion {first.name}, but {by_hand}" in out
    recorded = mcnemar.GateDecision.from_dict(Run(second).lineage.gate)
    assert not recorded.promote and recorded.reason.startswith("not promoted") and recorded.champion == first.name
    assert "not promoted" in Artifact.get("headstart-gate").description
