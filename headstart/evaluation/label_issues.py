"""Training images whose label is probably wrong: confident learning on out-of-fold probabilities.

Every training image gets class probabilities from a head that never saw it: the train split is
cut into k folds (by class, seeded, by content hash), and for each fold the head headstart trains
(Dropout → Dense softmax, fitted as the run's head settings say: headstart.training.fitting) is
fitted on the other folds' cached features and scores this fold. The backbone does not run.

Confident learning (C. G. Northcutt, L. Jiang, I. L. Chuang, "Confident Learning: Estimating
Uncertainty in Dataset Labels", JAIR 70, 2021; the method of cleanlab's find_label_issues) then
decides which images to flag:

1. each class's threshold t_j is the mean probability of class j over the images labelled j
   (its mean self-confidence);
2. the confident joint C[i, j] counts the images labelled i whose probability of j is at least
   t_j (the largest such j where several are): those confidently of class j;
3. each row of C is scaled to the number of images labelled i, which estimates how many images
   labelled i are really of class j;
4. prune by noise rate: for each i ≠ j, that many images labelled i are chosen, those with the
   largest margin p(j) − p(i); of these, the images the confident joint counts off its diagonal
   (confidently of a class other than their label) are flagged: the paper's "both", which on
   the benchmark flagged fewer images, more of them wrong, than either criterion alone
   (benchmarks/results/label-issues.md).

The flagged images are ranked by the normalised margin: score = (max_{j≠i} p(j) − p(i) + 1) / 2,
1 for an image certainly of another class, 0.5 where its label and the best other class tie;
the suggested label is that best other class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from headstart.features.encoding import features_matrix
from headstart.features.streams import damage_stops_the_run

if TYPE_CHECKING:
    from headstart.config import HeadConfig
    from headstart.features.dataset import FeatureSet

LABEL_ISSUE_SCHEMA = pa.schema(
    [
        ("rank", pa.int32()),
        ("path", pa.string()),
        ("sha256", pa.string()),
        ("given_label", pa.string()),
        ("suggested_label", pa.string()),
        ("self_confidence", pa.float32()),
        ("score", pa.float32()),
    ]
)


@dataclass(frozen=True)
class OutOfFold:
    """Each training image's probabilities from the head of the fold that left it out, in the train
    split's file row order."""

    probabilities: np.ndarray
    labels: np.ndarray
    paths: list[str]
    hashes: list[str]
    folds: int
    # False for an image no fold head could score: a train split of one image has no other to learn from.
    scored: np.ndarray


def assign_folds(hashes: list[str], labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Each image's fold, 0…folds−1: each class's images, in content-hash order, shuffled with the
    seed and dealt out in turn (each class going on from the fold where the last one stopped), so
    that every fold holds each class in the same share and the folds differ in size by one at most.
    Only the images, labels and seed decide it, never the order of the rows in a file."""
    fold_of = np.zeros(len(hashes), np.int64)
    generator = np.random.default_rng(seed)
    dealt = 0
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        members = members[np.argsort([hashes[i] for i in members], kind="stable")]
        fold_of[generator.permutation(members)] = (dealt + np.arange(len(members))) % folds
        dealt += len(members)
    return fold_of


def out_of_fold_probabilities(
    features: "FeatureSet", num_classes: int, head: "HeadConfig", folds: int = 5
) -> OutOfFold:
    """Trains `folds` heads as the run's head settings say (headstart.training.fitting.fit_configured_head:
    solver, class weights, weight decay), each on the train split without one fold (streamed: memory
    holds a row group at a time, except for the L-BFGS solver), and scores the fold it left out."""
    from headstart.training.fitting import fit_configured_head
    from headstart.training.head import new_head, predict_from_features

    rows = features.rows("train", ["path", "sha256", "label"])
    hashes, labels = rows["sha256"], np.asarray(rows["label"], np.int64)
    fold_of = assign_folds(hashes, labels, folds, head.seed)
    probabilities = np.zeros((len(hashes), num_classes), np.float32)
    scored = np.zeros(len(hashes), bool)
    row_of = {sha: row for row, sha in enumerate(hashes)}
    train = features.stream("train")
    for fold in range(folds):
        held_out = frozenset(sha for sha, f in zip(hashes, fold_of) if f == fold)
        if not held_out or len(held_out) == len(hashes):
            continue
        classifier = new_head(features_dim(features), num_classes, head.dropout, head.seed)
        fit_configured_head(head, classifier, features, leave_out=held_out)
        for table in _row_groups(features, train.groups, ["features", "sha256"]):
            chosen = np.array([sha in held_out for sha in table.column("sha256").to_pylist()], bool)
            if chosen.any():
                table = table.filter(pa.array(chosen))
                found = [row_of[sha] for sha in table.column("sha256").to_pylist()]
                probabilities[found] = predict_from_features(classifier, features_matrix(table))
                scored[found] = True
    return OutOfFold(probabilities, labels, rows["path"], hashes, folds, scored)


def _row_groups(features: "FeatureSet", groups, columns: list[str]):
    with damage_stops_the_run(features.path):
        parquet = pq.ParquetFile(features.path, page_checksum_verification=True)
        for group in groups:
            yield parquet.read_row_group(group, columns=columns)


def features_dim(features: "FeatureSet") -> int:
    """The length of the dataset's feature vectors (float32s in one fixed-size binary value each)."""
    with damage_stops_the_run(features.path):
        width = pq.read_schema(features.path).field("features").type.byte_width
    return width // np.dtype("<f4").itemsize


def confident_labels(labels: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The per-class thresholds (mean self-confidence), and each row's confident class: the most
    probable of those whose probability reaches their threshold; −1 where none does."""
    labels, probabilities = np.asarray(labels, np.int64), np.asarray(probabilities, np.float64)
    thresholds = np.array(
        [probabilities[labels == j, j].mean() if (labels == j).any() else 1.0 for j in range(probabilities.shape[1])]
    )
    above = probabilities >= thresholds
    return thresholds, np.where(above.any(axis=1), np.where(above, probabilities, -1.0).argmax(axis=1), -1)


def confident_joint(labels: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The per-class thresholds and the confident joint C[given, confident]."""
    labels = np.asarray(labels, np.int64)
    thresholds, confident = confident_labels(labels, probabilities)
    joint = np.zeros((len(thresholds), len(thresholds)), np.int64)
    counted = confident >= 0
    np.add.at(joint, (labels[counted], confident[counted]), 1)
    return thresholds, joint


# How the flagged set is chosen from the confident joint (the paper's names), what a run uses
# first: both takes the images in both of the other sets; prune_by_noise_rate takes as many
# images from each off-diagonal cell as the calibrated joint estimates, by margin;
# confident_joint takes the images counted off the diagonal.
FILTERS = ("both", "prune_by_noise_rate", "confident_joint")


def find_label_issues(labels: np.ndarray, probabilities: np.ndarray, filter_by: str = FILTERS[0]) -> np.ndarray:
    """The rows flagged by confident learning, most likely wrong first."""
    labels, probabilities = np.asarray(labels, np.int64), np.asarray(probabilities, np.float64)
    _, joint = confident_joint(labels, probabilities)
    given_counts = np.bincount(labels, minlength=joint.shape[0])
    row_sums = joint.sum(axis=1, keepdims=True)
    calibrated = np.divide(joint, row_sums, out=np.zeros(joint.shape), where=row_sums > 0) * given_counts[:, None]
    by_noise_rate = np.zeros(len(labels), bool)
    for i, j in zip(*np.nonzero(~np.eye(len(joint), dtype=bool))):
        count = int(round(calibrated[i, j]))
        if count:
            members = np.flatnonzero(labels == i)
            margins = probabilities[members, j] - probabilities[members, i]
            by_noise_rate[members[np.argsort(-margins, kind="stable")[:count]]] = True
    _, confident = confident_labels(labels, probabilities)
    off_diagonal = (confident >= 0) & (confident != labels)
    flagged = {
        "prune_by_noise_rate": by_noise_rate,
        "confident_joint": off_diagonal,
        "both": by_noise_rate & off_diagonal,
    }
    rows = np.flatnonzero(flagged[filter_by])
    return rows[np.argsort(-issue_scores(labels, probabilities)[rows], kind="stable")]


def issue_scores(labels: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """(max_{j≠i} p(j) − p(i) + 1) / 2 per row, i its given label: higher, more likely mislabelled."""
    self_confidence = probabilities[np.arange(len(labels)), labels]
    return (best_other(labels, probabilities)[1] - self_confidence + 1) / 2


def best_other(labels: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's most probable class other than its label, and that class's probability."""
    others = np.array(probabilities, np.float64)
    others[np.arange(len(labels)), labels] = -np.inf
    best = others.argmax(axis=1)
    return best, others[np.arange(len(labels)), best]


def label_issue_table(out_of_fold: OutOfFold, class_names: list[str] | tuple[str, ...]) -> pa.Table:
    """The flagged training images, most likely wrong first: what label_issues.parquet holds."""
    labels, probabilities = out_of_fold.labels, out_of_fold.probabilities
    checked = np.flatnonzero(out_of_fold.scored)
    rows = checked[find_label_issues(labels[checked], probabilities[checked])] if len(checked) else checked
    suggested, _ = best_other(labels, probabilities)
    return pa.table(
        {
            "rank": np.arange(1, len(rows) + 1, dtype=np.int32),
            "path": [out_of_fold.paths[row] for row in rows],
            "sha256": [out_of_fold.hashes[row] for row in rows],
            "given_label": [class_names[labels[row]] for row in rows],
            "suggested_label": [class_names[suggested[row]] for row in rows],
            "self_confidence": probabilities[rows, labels[rows]].astype(np.float32),
            "score": issue_scores(labels[rows], probabilities[rows].astype(np.float64)).astype(np.float32),
        },
        schema=LABEL_ISSUE_SCHEMA,
    )


def label_issue_summary(out_of_fold: OutOfFold, table: pa.Table, left_out: bool) -> dict:
    """What metrics.json records: how many training images were checked and flagged, in how many
    folds, the out-of-fold accuracy, and how many were left out of the model's training."""
    scored = out_of_fold.scored
    correct = out_of_fold.probabilities[scored].argmax(axis=1) == out_of_fold.labels[scored]
    return {
        "train_images": int(scored.sum()),
        "folds": out_of_fold.folds,
        "flagged": int(table.num_rows),
        "left_out": int(table.num_rows) if left_out else 0,
        "out_of_fold_accuracy": float(correct.mean()) if len(correct) else None,
    }


@dataclass(frozen=True)
class LabelIssues:
    """What a run keeps of the check: the flagged images (label_issues.parquet) and its summary
    (metrics.json's `label_issues`)."""

    table: pa.Table
    summary: dict

    @property
    def hashes(self) -> frozenset[str]:
        """The flagged images' content hashes: what a retrain without them leaves out."""
        return frozenset(self.table.column("sha256").to_pylist())


def find_training_label_issues(
    features: "FeatureSet",
    class_names: list[str] | tuple[str, ...],
    head: "HeadConfig",
    folds: int = 5,
    left_out: bool = False,
) -> LabelIssues:
    """The train split's probably mislabelled images, from `folds` heads trained with the run's head
    settings; `left_out` records that the run's model is trained without them."""
    out_of_fold = out_of_fold_probabilities(features, len(class_names), head, folds)
    table = label_issue_table(out_of_fold, class_names)
    return LabelIssues(table, label_issue_summary(out_of_fold, table, left_out))
