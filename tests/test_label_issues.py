"""Wrong labels in the training data: out-of-fold probabilities, confident learning, the ranked
table, leaving the flagged images out, and `headstart review`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import write_class_images
from feature_sets import sha, write_feature_set

from headstart.config import HeadConfig
from headstart.evaluation.label_issues import (
    assign_folds,
    confident_joint,
    find_label_issues,
    label_issue_table,
    out_of_fold_probabilities,
)
from headstart.features.streams import SelectedRows

CLASSES = ("cat", "dog", "fox")
FLIPPED = 12  # of 240 training images: 5 %


def _noisy_feature_set(path, seed: int = 0):
    """Three classes of 16 features around their own centre, clearly apart but overlapping a
    little; FLIPPED training images carry another class's label. Returns the set and their hashes."""
    generator = np.random.default_rng(seed)
    centres = generator.normal(0, 1.0, (len(CLASSES), 16))
    rows, flipped = [], set()
    for split, per_class in (("train", 80), ("validation", 20), ("test", 20)):
        for label in range(len(CLASSES)):
            for index in range(per_class):
                name = f"{split}-{label}-{index}"
                vector = centres[label] + generator.normal(0, 0.6, 16)
                rows.append([sha(name), split, label, vector.tolist()])
    train = [row for row in rows if row[1] == "train"]
    for row in (train[i] for i in generator.choice(len(train), FLIPPED, replace=False)):
        row[2] = (row[2] + int(generator.integers(1, len(CLASSES)))) % len(CLASSES)
        flipped.add(row[0])
    return write_feature_set(path, [tuple(row) for row in rows], CLASSES), flipped


HEAD = HeadConfig(epochs=30, batch_size=32, learning_rate=0.02, patience=5)


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    features, flipped = _noisy_feature_set(tmp_path_factory.mktemp("label-issues") / "features.parquet")
    out_of_fold = out_of_fold_probabilities(features, len(CLASSES), HEAD, folds=5)
    return features, flipped, out_of_fold


def test_flipped_labels_are_ranked_first(noisy):
    features, flipped, out_of_fold = noisy
    table = label_issue_table(out_of_fold, CLASSES)
    ranked = table.column("sha256").to_pylist()
    top = ranked[:FLIPPED]
    assert len(set(top) & flipped) >= FLIPPED - 2  # precision of the top k
    assert len(set(ranked) & flipped) >= FLIPPED - 2  # recall of the flagged set
    assert len(ranked) <= 2 * FLIPPED  # and the flagged set is not everything
    assert table.column("rank").to_pylist() == list(range(1, len(ranked) + 1))
    scores = table.column("score").to_numpy()
    assert (np.diff(scores) <= 0).all() and scores[0] > 0.5
    # The suggested label of a flipped image is the class it was taken from.
    rows = features.rows("train", ["sha256", "label"])
    assert table.column("given_label").to_pylist()[0] != table.column("suggested_label").to_pylist()[0]
    assert set(rows["sha256"]) >= set(ranked)


def test_out_of_fold_probabilities_are_deterministic_and_folds_are_stratified(noisy):
    features, _, out_of_fold = noisy
    assert out_of_fold.probabilities.shape == (240, 3)
    assert np.allclose(out_of_fold.probabilities.sum(axis=1), 1, atol=1e-5)
    again = out_of_fold_probabilities(features, len(CLASSES), HEAD, folds=5)
    assert np.array_equal(again.probabilities, out_of_fold.probabilities)
    folds = assign_folds(out_of_fold.hashes, out_of_fold.labels, 5, HEAD.seed)
    # Every fold holds each class in the same share, and the folds depend on the images, not on row order.
    counts = np.array([[np.sum((folds == f) & (out_of_fold.labels == c)) for c in range(3)] for f in range(5)])
    assert (counts.max(axis=0) - counts.min(axis=0) <= 1).all()
    order = np.random.default_rng(1).permutation(240)
    shuffled = assign_folds([out_of_fold.hashes[i] for i in order], out_of_fold.labels[order], 5, HEAD.seed)
    assert np.array_equal(shuffled, folds[order])


def test_the_fold_heads_are_fitted_as_the_run_s_head_settings_say(noisy):
    """With the L-BFGS logistic regression as the head's solver, the fold heads are logistic
    regressions too, and find the flipped labels as well."""
    features, flipped, _ = noisy
    out_of_fold = out_of_fold_probabilities(features, len(CLASSES), HeadConfig(solver="lbfgs"), folds=5)
    top = label_issue_table(out_of_fold, CLASSES).column("sha256").to_pylist()[:FLIPPED]
    assert len(set(top) & flipped) >= FLIPPED - 2


def test_confident_joint_and_noise_rate_pruning_on_known_probabilities():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    probabilities = np.array(
        [[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.2, 0.8], [0.1, 0.9], [0.2, 0.8], [0.25, 0.75], [0.6, 0.4]]
    )
    thresholds, joint = confident_joint(labels, probabilities)
    assert np.allclose(thresholds, [0.65, 0.7125])
    # Image 3 (labelled 0) is confidently 1; image 7 (labelled 1) reaches neither threshold.
    assert joint.tolist() == [[3, 1], [0, 3]]
    assert find_label_issues(labels, probabilities).tolist() == [3]


def test_selected_rows_stream_leaves_out_the_given_images(noisy):
    features, flipped, _ = noisy
    train = features.stream("train")
    kept = SelectedRows(train, frozenset(flipped), keep=False)
    only = SelectedRows(train, frozenset(flipped), keep=True)
    assert (kept.num_rows, only.num_rows) == (240 - FLIPPED, FLIPPED)
    assert sum(len(labels) for _, labels in kept.shuffled_chunks(0, 0)) == 240 - FLIPPED
    rows = features.rows("train", ["sha256", "label"])
    flipped_labels = sorted(label for sha256, label in zip(rows["sha256"], rows["label"]) if sha256 in flipped)
    assert sorted(np.concatenate([labels for _, labels in only.chunks()]).tolist()) == flipped_labels


@pytest.fixture(scope="module")
def dropped_run(prefect_harness, tiny_backbone_dir, tmp_path_factory):
    """A train flow run with --drop-label-issues on red and blue images, six red ones filed under
    blue; returns the run, the moved images that landed in the train split, and the number of rows
    each head training saw (in call order)."""
    import headstart.training.head
    from flows.train import train
    from headstart.config import TrainConfig
    from headstart.registry.runs import Run

    tmp_path = tmp_path_factory.mktemp("dropped-run")
    folder = write_class_images(tmp_path / "data", {"red": (200, 40, 40), "blue": (40, 40, 200)}, per_class=30)
    moved = []
    for index in range(6):
        source = folder / "red" / f"{index:03d}.png"
        moved.append(source.rename(folder / "blue" / f"was-red-{index}.png"))
    trained_on = []
    fit = headstart.training.head.train_head

    def recording(classifier, train_rows, *args, **kwargs):
        trained_on.append(train_rows.num_rows)
        return fit(classifier, train_rows, *args, **kwargs)

    config = TrainConfig.smoke(
        data=str(folder),
        backbone=str(tiny_backbone_dir),
        artifacts_root=tmp_path / "artifacts",
        cache_dir=tmp_path / "cache",
        epochs=40,
        learning_rate=0.1,
        batch_size=8,
        patience=40,
        gate=False,
        near_duplicate_threshold=1.0,
        drop_label_issues=True,
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(headstart.training.head, "train_head", recording)
        run = Run(Path(train(**config.flat())))
    index = run.data_index()
    in_train = {sha for sha, split in zip(index["sha256"].to_pylist(), index["split"].to_pylist()) if split == "train"}
    moved_in_train = [path for path in moved if hashlib.sha256(path.read_bytes()).hexdigest() in in_train]
    return run, moved_in_train, trained_on


def test_the_train_flow_flags_moved_images_and_drop_label_issues_trains_without_them(dropped_run):
    """The run's label_issues.parquet names some of the moved images that are training images, and
    nothing else; with --drop-label-issues the run's head is trained on the other training images."""
    run, moved_in_train, trained_on = dropped_run
    issues = run.label_issues()
    flagged = issues.column("path").to_pylist()
    summary = run.metrics["label_issues"]
    assert summary["flagged"] == len(flagged) == summary["left_out"] > 0
    assert summary["folds"] == 5 and summary["train_images"] == trained_on[0]
    # The first head, five fold heads, and the run's head: on every training image but the flagged ones.
    assert len(trained_on) == 7 and trained_on[-1] == trained_on[0] - len(flagged)
    # Each flagged image is one of them (the generated feature sets above measure the recall).
    assert {str(Path(path)) for path in flagged} <= {str(path) for path in moved_in_train}
    assert set(issues.column("given_label").to_pylist()) == {"blue"}
    assert set(issues.column("suggested_label").to_pylist()) == {"red"}
    assert (
        f"**{len(flagged)}** of {summary['train_images']} training images are flagged as probably mislabelled"
        in run.model_card
        and "the head was trained without them." in run.model_card
    )


def test_the_dashboard_shows_the_flagged_images_with_thumbnails(dropped_run):
    from prefect.artifacts import Artifact

    run, _, _ = dropped_run
    flagged = run.label_issues().num_rows
    dashboard = Artifact.get("headstart-label-issues")
    assert dashboard.data.count("data:image/png;base64,") == flagged and "was-red-" in dashboard.data
    assert dashboard.description.startswith(f"{flagged} of 48 training images flagged")
    assert dashboard.description.endswith("left out of the model's training")


def test_review_prints_the_ranking_and_says_when_a_run_has_none(dropped_run, tmp_path):
    """`headstart review RUN`: a run directory's flagged images, most likely first; one line for a
    run without the check."""
    import contextlib
    import io
    import shutil

    from flows.cli import main

    run, _, _ = dropped_run
    flagged = run.label_issues().column("path").to_pylist()

    def review(*args) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = main(["review", *args])
        return status, out.getvalue(), err.getvalue()

    status, out, _ = review(str(run.path))
    lines = out.splitlines()
    assert status == 0 and lines[0].startswith(f"run {run.path.name}: {len(flagged)} of 48 training images flagged")
    assert "left out of the model's training" in lines[0]
    assert lines[1].split() == ["rank", "score", "given", "suggested", "path"]
    assert [line.split()[-1] for line in lines[2:]] == flagged
    assert lines[2].split()[:4] == ["1", lines[2].split()[1], "blue", "red"]
    status, out, _ = review(str(run.path), "--top", "1", "--json")
    assert status == 0 and [row["path"] for row in json.loads(out)] == flagged[:1]

    unchecked = tmp_path / "unchecked"
    shutil.copytree(run.path, unchecked)
    (unchecked / "label_issues.parquet").unlink()
    status, out, err = review(str(unchecked))
    assert status == 2 and out == ""
    assert err == (
        "headstart: error: run unchecked has no label_issues.parquet: it was trained with --no-label-issues or "
        "before headstart looked for wrong labels; train again to review its labels\n"
    )
    status, _, err = review(str(run.path), "--top", "0")
    assert status == 2 and err.count("\n") == 1 and "--top 0" in err


def test_drop_label_issues_needs_the_check_and_refuses_fine_tuning():
    from pydantic import ValidationError

    from headstart.config import TrainConfig

    assert TrainConfig(data="photos").evaluation.label_issues
    with pytest.raises(ValidationError, match="--drop-label-issues leaves out the images the label-issue check"):
        TrainConfig(data="photos", label_issues=False, drop_label_issues=True)
    with pytest.raises(ValidationError, match="not out of fine-tuning"):
        TrainConfig(data="photos", drop_label_issues=True, fine_tune=True)


def test_a_train_split_too_small_to_fold_is_checked_as_far_as_it_can_be(tmp_path):
    """Fewer training images than folds: the empty folds are skipped and every image is still
    scored; one training image alone cannot be scored, and nothing is flagged."""
    rows = [(sha(f"t{i}"), "train", i % 2, [float(i % 2), 1.0 - i % 2]) for i in range(3)]
    rows += [(sha(f"v{i}"), "validation", i % 2, [float(i % 2), 1.0 - i % 2]) for i in range(2)]
    features = write_feature_set(tmp_path / "three.parquet", rows, CLASSES[:2])
    out_of_fold = out_of_fold_probabilities(features, 2, HeadConfig(epochs=2), folds=5)
    assert out_of_fold.scored.all()
    one = write_feature_set(tmp_path / "one.parquet", rows[:1] + rows[3:], CLASSES[:2])
    alone = out_of_fold_probabilities(one, 2, HeadConfig(epochs=2), folds=5)
    assert not alone.scored.any() and label_issue_table(alone, CLASSES[:2]).num_rows == 0
