"""The training key: derived from every configuration field that can change a run's result."""

import hashlib
import json

from pydantic import Field

from headstart import __version__
from headstart.config import RESULT_NEUTRAL, HeadConfig, TrainConfig
from headstart.registry.reuse import training_key


def _key(config: TrainConfig) -> str:
    return training_key(config, "m" * 16, "b" * 16)


def test_a_new_field_counts_towards_the_key_unless_it_is_marked_neutral():
    class HeadWithNewFields(HeadConfig):
        label_smoothing: float = 0.0
        progress_bars: bool = Field(True, json_schema_extra=RESULT_NEUTRAL)

    class WithNewFields(TrainConfig):
        head: HeadWithNewFields = HeadWithNewFields()

    base = WithNewFields(data="photos")
    assert _key(base.with_options(label_smoothing=0.1)) != _key(base)
    assert _key(base.with_options(progress_bars=False)) == _key(base)
    assert (
        "label_smoothing" in WithNewFields.counted_by_value()
        and "progress_bars" not in WithNewFields.counted_by_value()
    )


def test_every_counted_field_changes_the_key_and_no_marked_one_does():
    base = TrainConfig(data="photos")
    changed = {
        "image_size": 224,
        "epochs": 7,
        "batch_size": 32,
        "dropout": 0.5,
        "learning_rate": 0.01,
        "patience": 2,
        "seed": 3,
        "near_duplicate_threshold": 0.95,
        "class_weights": "balanced",
        "calibrate": False,
        "target_accuracy": 0.97,
        "weight_decay": 0.01,
        "solver": "lbfgs",
        "sweep": True,
        "label_issues": False,
        "label_issue_folds": 3,
        "drop_label_issues": True,
    }
    assert set(changed) == set(TrainConfig.counted_by_value())
    for name, value in changed.items():
        assert _key(base.with_options(**{name: value})) != _key(base), name
    neutral = {
        "data": "elsewhere",
        "classes": ("a", "b"),
        "validation_fraction": 0.2,
        "test_fraction": 0.2,
        "max_images_per_class": 3,
        "backbone": "/some/savedmodel",
        "engine": "keras",
        "threads": 1,
        "extraction_batch_size": 8,
        "extraction_shard_size": 9,
        "task_runner": "dask",
        "dask_address": "tcp://x:1",
        "dask_workers": 4,
        "reuse_identical_runs": False,
        "artifacts_root": "/tmp/a",
        "cache_dir": "/tmp/c",
        "cifar10_source": "/tmp/cifar.tar.gz",
        "gate": False,
        "gate_tolerance": 0.01,
        "gate_alpha": 0.01,
        "gate_floor": 0.6,
        "export": "tflite",
    }
    # Fine-tuning's settings count where it runs, and not at all where it does not.
    fine_tuning = {
        "fine_tune_from": 7,
        "fine_tune_epochs": 3,
        "fine_tune_learning_rate": 1e-4,
        "fine_tune_patience": 1,
        "fine_tune_flip": False,
        "fine_tune_shift": 0.0,
        "fine_tune_mixup": 0.2,
        "fine_tune_cutmix": 1.0,
        "fine_tune_mirror_average": True,
    }
    assert set(neutral) | set(changed) | set(fine_tuning) | {"fine_tune"} == set(TrainConfig.options())
    for name, value in neutral.items():
        assert _key(base.with_options(**{name: value})) == _key(base), name
    tuned = base.with_options(**{"fine_tune": True})
    assert _key(tuned) != _key(base)
    for name, value in fine_tuning.items():
        assert _key(base.with_options(**{name: value})) == _key(base), name
        assert _key(tuned.with_options(**{name: value})) != _key(tuned), name
    # What those fields change, the fingerprints count.
    assert training_key(base, "n" * 16, "b" * 16) != _key(base) != training_key(base, "m" * 16, "c" * 16)


def test_the_key_is_the_one_existing_run_indexes_were_written_with():
    config = TrainConfig(data="photos", image_size=96, epochs=12, seed=4)
    # The near-duplicate threshold joined the key with the check itself, so that runs indexed before
    # it (which have no near-duplicate report) are retrained rather than copied; so did calibration,
    # class weights, the target accuracy and the sweep's options, so that runs from before them
    # (uncalibrated) are too; and the label-issue options (runs indexed before them have no
    # label_issues.parquet).
    written_by_earlier_versions = {
        "manifest": "m" * 16,
        "backbone": "b" * 16,
        "headstart": __version__,
        "image_size": 96,
        "epochs": 12,
        "batch_size": 64,
        "dropout": 0.2,
        "learning_rate": 1e-3,
        "patience": 5,
        "seed": 4,
        "near_duplicate_threshold": 0.88,
        "class_weights": "auto",
        "calibrate": True,
        "target_accuracy": None,
        "weight_decay": 0.0,
        "solver": "adam",
        "sweep": False,
        "label_issues": True,
        "label_issue_folds": 5,
        "drop_label_issues": False,
    }
    assert (
        _key(config)
        == hashlib.sha256(json.dumps(written_by_earlier_versions, sort_keys=True).encode()).hexdigest()[:20]
    )


def test_the_index_finds_the_run_under_the_artifacts_root_asked_for(tmp_path, monkeypatch):
    """A key's result held under two artifacts roots: each root finds its own, another root the
    first; an index entry written before entries kept one run per root still finds its run."""
    import headstart.registry.runs
    from headstart.registry.reuse import find_identical_run, record_run

    runs = {}
    for root in ("a", "b"):
        runs[root] = tmp_path / root / "20260101-000000-000000"
        runs[root].mkdir(parents=True)
        (runs[root] / "config.json").write_text(json.dumps({"training_key": "k"}))
        (runs[root] / "class_names.json").write_text('["cat", "dog"]')
    # A directory with these two counts as complete here: the other run files are not the point.
    monkeypatch.setattr(headstart.registry.runs, "REQUIRED_RUN_FILES", ("config.json", "class_names.json"))
    record_run(tmp_path / "cache", "k", runs["a"])
    record_run(tmp_path / "cache", "k", runs["b"])
    assert find_identical_run(tmp_path / "cache", "k", tmp_path / "a") == runs["a"]
    assert find_identical_run(tmp_path / "cache", "k", tmp_path / "b") == runs["b"]
    assert find_identical_run(tmp_path / "cache", "k", tmp_path / "c") == runs["a"]
    (tmp_path / "cache" / "runs" / "k.json").write_text(json.dumps({"run_dir": str(runs["b"])}))
    assert find_identical_run(tmp_path / "cache", "k", tmp_path / "a") == runs["b"]
