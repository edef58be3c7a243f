"""The promotion gate on constructed predictions: exact McNemar p-values, tolerance, first model, classes;
and the decision around it (headstart.promotion.decide) on hand-made features files, a champion's run
directory in a registry, and hand-made probabilities: which test images the champion never trained on,
what is scored, what is noted. No model is loaded: the champion's scores stand in for run_probabilities."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from feature_sets import sha, write_feature_set

from headstart.backbone.handles import Backbone
from headstart.config import TrainConfig
from headstart.data.manifest import assign_split, hash_fraction
from headstart.errors import HeadstartError
from headstart.evaluation import drift
from headstart.features.dataset import FeatureSet
from headstart.promotion import decide
from headstart.promotion import mcnemar as gate
from headstart.registry import versions as registry
from headstart.registry.runs import (
    BACKBONE_DIR,
    CLASS_NAMES_FILE,
    CONFIG_FILE,
    DATA_INDEX_FILE,
    LINEAGE_FILE,
    METRICS_FILE,
    PLOTS_DIR,
    REQUIRED_RUN_FILES,
    SERVING_DIR,
    Run,
)


@pytest.mark.parametrize(
    "b, c, expected",
    [
        (0, 0, 1.0),
        (5, 0, 1 / 32),  # P(B ≥ 5), B ~ Bin(5, 1/2): only 5 of 5
        (0, 5, 1.0),  # P(B ≥ 0)
        (3, 1, (4 + 1) / 16),  # C(4,3) + C(4,4) over 2^4
        (7, 3, (120 + 45 + 10 + 1) / 1024),  # C(10,7..10) over 2^10 = 0.171875
        (9, 1, (10 + 1) / 1024),
    ],
)
def test_exact_one_sided_mcnemar_against_the_hand_computed_binomial(b, c, expected):
    assert gate.mcnemar_worse_p_value(b, c) == pytest.approx(expected, rel=1e-12)


def _paired(both_right: int, only_champion: int, only_candidate: int, both_wrong: int):
    candidate = [True] * both_right + [False] * only_champion + [True] * only_candidate + [False] * both_wrong
    champion = [True] * both_right + [True] * only_champion + [False] * only_candidate + [False] * both_wrong
    return np.array(candidate), np.array(champion)


def test_a_candidate_shown_worse_is_not_promoted_even_within_tolerance():
    candidate, champion = _paired(80, 12, 2, 6)  # 0.82 vs 0.92; p = P(B ≥ 12 | 14) = 106 / 16384
    decision = gate.against_champion(candidate, champion, "v1", tolerance=0.2)
    assert not decision.promote
    assert (decision.candidate_only_wrong, decision.candidate_only_right) == (12, 2)
    assert decision.p_value == pytest.approx((91 + 14 + 1) / 2**14)
    assert "McNemar" in decision.reason and "v1" in decision.reason


def test_lower_accuracy_beyond_tolerance_keeps_the_champion():
    candidate, champion = _paired(80, 4, 3, 13)  # 0.83 vs 0.84, p = P(B ≥ 4 | 7) = 0.5
    assert not gate.against_champion(candidate, champion, "v1").promote
    decision = gate.against_champion(candidate, champion, "v1", tolerance=0.02)
    assert decision.promote and decision.p_value == pytest.approx(64 / 128)


def test_an_equal_or_better_candidate_is_promoted():
    candidate, champion = _paired(80, 3, 5, 12)
    decision = gate.against_champion(candidate, champion, "v1")
    assert decision.promote and decision.candidate_accuracy == 0.85 and decision.champion_accuracy == 0.83
    assert gate.against_champion(*_paired(50, 0, 0, 50), "v1").promote  # identical predictions: not worse


def test_the_first_model_must_beat_the_most_common_class_or_the_floor():
    labels = np.array([0] * 70 + [1] * 30)
    assert not gate.first_model(np.arange(100) < 70, labels).promote  # 0.70: what always saying "0" gets
    decision = gate.first_model(np.arange(100) < 71, labels)
    assert decision.promote and decision.floor == 0.7
    assert not gate.first_model(np.arange(100) < 71, labels, floor=0.9).promote


def test_a_first_model_on_a_one_class_test_split_is_not_promoted_and_the_reason_says_why():
    decision = gate.first_model(np.ones(2, bool), np.zeros(2, int))
    assert (
        not decision.promote
        and "every test image is of one class" in decision.reason
        and "headstart models promote" in decision.reason
    )


def test_a_candidate_for_other_classes_is_never_promoted_automatically():
    decision = gate.different_classes(["cat", "dog"], ["cat", "fox"], "v1", 0.99, 100)
    assert not decision.promote and "differ" in decision.reason


# --- the decision around the test: which images count, what the champion scores, what is noted --------------------

CLASSES = ["cat", "dog"]
BACKBONE = Backbone("fixture", Path("not-loaded"), "backbone-a", 32)
# The candidate's folder split: 10 % validation, 30 % test, by content hash.
VALIDATION, TEST = 0.1, 0.3


def _images(count: int = 60) -> list[tuple[str, str, int, list[float]]]:
    """(content hash, split, label, features) of `count` images split as the candidate splits them."""
    rows = []
    for i in range(count):
        content = sha(f"image {i}")
        rows.append((content, assign_split(content, VALIDATION, TEST), i % 2, [float(i % 2), 1.0]))
    return rows


@pytest.fixture
def candidate(tmp_path) -> FeatureSet:
    return write_feature_set(tmp_path / "candidate.parquet", _images(), CLASSES)


def _config(tmp_path, **overrides) -> TrainConfig:
    values = dict(
        data=str(tmp_path / "photos"),
        artifacts_root=tmp_path / "artifacts",
        cache_dir=tmp_path / "cache",
        validation_fraction=VALIDATION,
        test_fraction=TEST,
    )
    return TrainConfig(**{**values, **overrides})


def _decide(config: TrainConfig, *candidate):
    """The gate's decision as the gate task asks for it: the registry's champion passed in."""
    champion = registry.champion(config.runtime.artifacts_root)
    return decide.decide(config.gate, champion, config.data.source, *candidate)


def _decide_for_identical_run(config: TrainConfig, run, *candidate):
    champion = registry.champion(config.runtime.artifacts_root)
    return decide.decide_for_identical_run(config.gate, champion, config.data.source, run, *candidate)


def _never_trained_on(config: TrainConfig, champion, hashes):
    return decide._images_the_champion_never_trained_on(config.data.source, champion, hashes)


def _run(
    root: Path,
    version: str,
    *,
    data: str = "/photos",
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    class_names: list[str] = CLASSES,
    index: pa.Table | None = None,
    metrics: dict | None = None,
) -> Run:
    """A run directory holding every file a complete run has; only what the gate reads has content."""
    path = root / version
    path.mkdir(parents=True)
    for name in REQUIRED_RUN_FILES:
        if name in (SERVING_DIR, BACKBONE_DIR, PLOTS_DIR):
            (path / name).mkdir()
        else:
            (path / name).write_text("{}")
    (path / CLASS_NAMES_FILE).write_text(json.dumps(class_names))
    config = dict(data=data, validation_fraction=validation_fraction, test_fraction=test_fraction)
    (path / CONFIG_FILE).write_text(json.dumps({**config, "backbone_fingerprint": BACKBONE.fingerprint}))
    (path / METRICS_FILE).write_text(json.dumps(metrics or {"accuracy": 0.9, "n": 25}))
    (path / LINEAGE_FILE).write_text(json.dumps(_lineage(version, class_names)))
    if index is not None:
        pq.write_table(index, path / DATA_INDEX_FILE)
    return Run(path)


def _lineage(version: str, class_names: list[str]) -> dict:
    """A lineage as the first runs that kept one wrote it: without the feature reference, so the drift
    note compares the data alone."""
    return {
        "version": version,
        "created_at": "2026-12-01T00:00:00+00:00",
        "headstart": "0.1.0",
        "flow_run_id": None,
        "data": {"source": "photos", "splits": {}},
        "class_names": class_names,
        "backbone": {"handle": "stand-in", "fingerprint": BACKBONE.fingerprint, "image_size": BACKBONE.image_size},
        "parameters": {},
        "training_key": "k" * 20,
        "metrics": {"accuracy": 0.9, "n": 25, "macro_f1": 0.9},
    }


def _champion(tmp_path, candidate: FeatureSet, **settings) -> Run:
    """The registry's champion, "v1": its data index is the candidate's less three images, so three are new."""
    index = drift.data_index(candidate, CLASSES).slice(3)
    run = _run(tmp_path / "artifacts", "v1", index=index, **settings)
    registry.promote(tmp_path / "artifacts", "v1", "the fixture's champion")
    return run


def _test_split(features: FeatureSet) -> tuple[list[str], np.ndarray]:
    test = features.rows("test", ["sha256", "label"])
    return test["sha256"], np.asarray(test["label"])


def _probabilities(labels: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Two-class probabilities that pick the label where `right`, the other class elsewhere."""
    predicted = np.where(right, labels, 1 - labels)
    return np.where(np.arange(2)[None, :] == predicted[:, None], 0.9, 0.1).astype(np.float32)


def _champion_fair(hashes: list[str]) -> np.ndarray:
    """The test images a champion split 10 % validation, 10 % test held out."""
    fair = np.array([hash_fraction(content) < 0.1 for content in hashes])
    assert 0 < fair.sum() < len(hashes)  # else the tests could not tell its test split from the candidate's
    return fair


def _not_scored(*args, **kwargs):
    raise AssertionError("no run is scored for this decision")


def test_both_runs_on_cifar10_hold_out_the_same_official_test_set(tmp_path, candidate):
    champion = _run(tmp_path, "v1", data="cifar10")
    hashes, _ = _test_split(candidate)
    fair, note = _never_trained_on(_config(tmp_path, data="cifar10"), champion, hashes)
    assert fair.dtype == bool and fair.all()
    assert note == f"all {len(hashes)} test images: both runs hold out CIFAR-10's official test set"


def test_a_champion_trained_on_cifar10_may_have_seen_any_image_of_a_folder_candidate(tmp_path, candidate):
    champion = _run(tmp_path, "v1", data="cifar10")
    hashes, _ = _test_split(candidate)
    fair, note = _never_trained_on(_config(tmp_path), champion, hashes)
    assert fair.dtype == bool and not fair.any() and len(fair) == len(hashes)
    assert note.startswith("the champion trained on CIFAR-10 and this run on a folder")


def test_with_the_same_split_settings_the_champion_held_out_every_test_image_too(tmp_path, candidate):
    champion = _run(tmp_path, "v1", validation_fraction=VALIDATION, test_fraction=TEST)
    hashes, _ = _test_split(candidate)
    fair, note = _never_trained_on(_config(tmp_path), champion, hashes)
    assert fair.all() and note == f"all {len(hashes)} test images: the champion's split settings hold them out too"


def test_with_other_split_settings_only_the_images_the_champions_own_settings_held_out_count(tmp_path, candidate):
    champion = _run(tmp_path, "v1", validation_fraction=0.1, test_fraction=0.1)
    hashes, _ = _test_split(candidate)
    expected = _champion_fair(hashes)
    fair, note = _never_trained_on(_config(tmp_path), champion, hashes)
    np.testing.assert_array_equal(fair, expected)
    assert note == (
        f"{expected.sum()} of {len(hashes)} test images: those the champion's split settings put in its own test split"
    )
    # The candidate's own settings play no part: only where the champion put each image does.
    again, _ = _never_trained_on(_config(tmp_path, test_fraction=0.45), champion, hashes)
    np.testing.assert_array_equal(again, expected)


def test_with_no_champion_the_first_model_meets_the_floor_and_no_run_is_scored(tmp_path, candidate, monkeypatch):
    monkeypatch.setattr(decide, "run_probabilities", _not_scored)
    hashes, labels = _test_split(candidate)
    probabilities = _probabilities(labels, np.ones(len(labels), bool))
    decision = _decide(_config(tmp_path), BACKBONE, candidate, probabilities, CLASSES)
    assert decision.promote and decision.reason.startswith("first model promoted")
    assert (decision.images, decision.candidate_accuracy, decision.champion, decision.drift) == (
        len(labels),
        1.0,
        None,
        None,
    )
    floored = _decide(_config(tmp_path, gate_floor=1.0), BACKBONE, candidate, probabilities, CLASSES)
    assert not floored.promote and floored.floor == 1.0


def test_a_champion_for_other_classes_is_kept_unscored_and_the_decision_still_carries_the_drift_note(
    tmp_path, candidate, monkeypatch
):
    monkeypatch.setattr(decide, "run_probabilities", _not_scored)
    _champion(tmp_path, candidate, class_names=["cat", "fox"])
    _, labels = _test_split(candidate)
    probabilities = _probabilities(labels, np.ones(len(labels), bool))
    decision = _decide(_config(tmp_path), BACKBONE, candidate, probabilities, CLASSES)
    assert not decision.promote and "differ" in decision.reason and decision.champion == "v1"
    assert decision.drift["champion"] == "v1" and decision.drift["new_images"] == 3


def _champion_scores(calls: list, right_on: np.ndarray, labels: np.ndarray, left_out: int | None = None):
    """A stand-in for run_probabilities: the champion right where `right_on` among the images it
    is asked about, and, where `left_out` is given, that image (a position in the test split) left
    out as if its file had changed."""

    def scores(run, backbone, features, fair, paths, hashes):
        calls.append((run.path.name, fair.copy(), list(hashes)))
        scored = fair.copy()
        if left_out is not None:
            scored[left_out] = False
        return _probabilities(labels[scored], right_on[scored]), scored

    return scores


def test_the_champion_is_scored_only_on_the_images_it_held_out_and_mcnemar_decides(tmp_path, candidate, monkeypatch):
    _champion(tmp_path, candidate, validation_fraction=0.1, test_fraction=0.1)
    hashes, labels = _test_split(candidate)
    fair = _champion_fair(hashes)
    # Right on every image the champion held out but five; wrong on all the others, which must not count.
    candidate_right = fair.copy()
    candidate_right[np.flatnonzero(fair)[:5]] = False
    calls = []
    monkeypatch.setattr(decide, "run_probabilities", _champion_scores(calls, np.ones(len(labels), bool), labels))
    probabilities = _probabilities(labels, candidate_right)

    # A tolerance that lets any accuracy through: McNemar alone decides. Five images only the
    # champion gets right, none only the candidate: p = 1/32.
    kept = _decide(_config(tmp_path, gate_tolerance=1.0), BACKBONE, candidate, probabilities, CLASSES)
    assert [name for name, _, _ in calls] == ["v1"] and calls[0][2] == hashes
    np.testing.assert_array_equal(calls[0][1], fair)
    assert not kept.promote and "McNemar" in kept.reason
    assert (kept.images, kept.candidate_only_wrong, kept.candidate_only_right) == (fair.sum(), 5, 0)
    assert (kept.p_value, kept.tolerance, kept.alpha, kept.champion) == (1 / 32, 1.0, 0.05, "v1")
    assert kept.candidate_accuracy == pytest.approx((fair.sum() - 5) / fair.sum()) and kept.champion_accuracy == 1.0
    assert kept.notes == [
        f"{fair.sum()} of {len(hashes)} test images: those the champion's split settings put in its own test split"
    ]
    assert kept.drift["champion"] == "v1" and kept.drift["new_images"] == 3

    stricter = _config(tmp_path, gate_tolerance=1.0, gate_alpha=0.01)
    assert _decide(stricter, BACKBONE, candidate, probabilities, CLASSES).promote


def test_test_images_whose_files_changed_since_are_left_out_of_both_sides_and_noted(tmp_path, candidate, monkeypatch):
    _champion(tmp_path, candidate, validation_fraction=VALIDATION, test_fraction=TEST)
    hashes, labels = _test_split(candidate)
    # The candidate is wrong on one image only, the one the champion could not be scored on.
    changed = 2
    candidate_right = np.arange(len(labels)) != changed
    monkeypatch.setattr(
        decide, "run_probabilities", _champion_scores([], np.ones(len(labels), bool), labels, left_out=changed)
    )
    decision = _decide(_config(tmp_path), BACKBONE, candidate, _probabilities(labels, candidate_right), CLASSES)
    assert decision.promote and decision.images == len(labels) - 1
    assert (decision.candidate_accuracy, decision.candidate_only_wrong, decision.candidate_only_right) == (1.0, 0, 0)
    assert decision.notes == [
        f"all {len(labels)} test images: the champion's split settings hold them out too",
        "1 of those left out: their files changed or went since the run read them",
    ]


def test_a_champion_that_may_have_trained_on_every_test_image_is_kept_for_want_of_fair_images(
    tmp_path, candidate, monkeypatch
):
    # The real run_probabilities: with no image to score it returns before loading any model.
    _champion(tmp_path, candidate, data="cifar10")
    _, labels = _test_split(candidate)
    probabilities = _probabilities(labels, np.ones(len(labels), bool))
    decision = _decide(_config(tmp_path), BACKBONE, candidate, probabilities, CLASSES)
    assert not decision.promote and decision.images == 0
    assert decision.reason == "no images both models can be scored on fairly; champion v1 kept"
    assert decision.notes == [
        "the champion trained on CIFAR-10 and this run on a folder: no test image is known to be unseen by it"
    ]


def test_an_identical_run_that_is_the_champion_already_changes_nothing(tmp_path, candidate, monkeypatch):
    monkeypatch.setattr(decide, "run_probabilities", _not_scored)
    champion = _champion(tmp_path, candidate)
    decision = _decide_for_identical_run(_config(tmp_path), champion, BACKBONE, candidate, CLASSES)
    assert not decision.promote and decision.reason.endswith("is the champion already: nothing to change")
    assert (decision.images, decision.candidate_accuracy, decision.champion) == (25, 0.9, "v1")


def test_an_identical_run_that_is_not_the_champion_is_scored_on_every_test_image_and_judged_as_a_new_model(
    tmp_path, candidate, monkeypatch
):
    _champion(tmp_path, candidate, validation_fraction=VALIDATION, test_fraction=TEST)
    earlier = _run(tmp_path / "artifacts", "v0")
    hashes, labels = _test_split(candidate)
    # The earlier run is wrong on six images the champion gets right: shown worse, p = 1/64.
    earlier_right = np.arange(len(labels)) >= 6
    calls = []
    earlier_scores = _champion_scores(calls, earlier_right, labels)
    champion_scores = _champion_scores(calls, np.ones(len(labels), bool), labels)
    monkeypatch.setattr(
        decide,
        "run_probabilities",
        lambda run, *args: (earlier_scores if run.path.name == "v0" else champion_scores)(run, *args),
    )
    decision = _decide_for_identical_run(_config(tmp_path, gate_tolerance=1.0), earlier, BACKBONE, candidate, CLASSES)
    assert [name for name, _, _ in calls] == ["v0", "v1"] and calls[0][1].all()
    assert not decision.promote and decision.champion == "v1" and "McNemar" in decision.reason
    assert (decision.candidate_only_wrong, decision.candidate_only_right, decision.p_value) == (6, 0, 1 / 64)


def test_an_identical_run_is_not_judged_on_part_of_the_test_split_when_some_images_changed(
    tmp_path, candidate, monkeypatch
):
    earlier = _run(tmp_path / "artifacts", "v0")
    _, labels = _test_split(candidate)
    monkeypatch.setattr(
        decide, "run_probabilities", _champion_scores([], np.ones(len(labels), bool), labels, left_out=0)
    )
    with pytest.raises(HeadstartError, match=r"^1 test images changed while this run read them; run it again"):
        _decide_for_identical_run(_config(tmp_path), earlier, BACKBONE, candidate, CLASSES)
