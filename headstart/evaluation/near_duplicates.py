"""Near-duplicate leakage: held-out images whose nearest training image is (almost) the same photo.

Exact copies never reach two splits (the manifest keeps one image per content hash), but a
photo re-encoded, resized, shifted by a pixel or slightly brightened has other bytes and so lands
in a split of its own. A test image like that measures memory, not generalisation. Here every
held-out image's nearest training image is found by the cosine similarity of their backbone
features, read from the dataset's features file (the backbone does not run again), and the pairs
above a threshold are flagged. The test split's accuracy is then given with and without them.

The default threshold was calibrated for the bundled MobileNetV2 at 160 px; how, and what pairs
look like either side of it, is in benchmarks/results/leakage-calibration.md. Similarities of
another backbone's features are on another scale.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.parquet as pq

from headstart.config import DEFAULT_NEAR_DUPLICATE_THRESHOLD
from headstart.features.encoding import features_matrix

if TYPE_CHECKING:
    from headstart.features.dataset import FeatureSet

# The held-out splits checked against train: test, whose accuracy is reported, and validation,
# whose loss decides when training stops.
CHECKED_SPLITS = ("test", "validation")
# Query rows per matrix product: 1024 × 2048 float32 similarities are 8 MB.
QUERY_BLOCK = 1024


def unit_rows(features: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (float32), so that a dot product is a cosine; all-zero rows stay zero."""
    features = np.asarray(features, np.float32)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, np.finfo(np.float32).tiny)


class NearestNeighbours:
    """For each query row, the most similar reference row seen so far and its cosine similarity.
    References are added block by block (a row group of the train split at a time), so memory
    holds the queries and one block."""

    def __init__(self, queries: np.ndarray):
        self.queries = unit_rows(queries)
        self.similarities = np.full(len(self.queries), -np.inf, np.float32)
        self.indices = np.full(len(self.queries), -1, np.int64)
        self.seen = 0

    def add(self, references: np.ndarray) -> None:
        references = unit_rows(references)
        for start in range(0, len(self.queries), QUERY_BLOCK):
            block = self.queries[start : start + QUERY_BLOCK] @ references.T
            if not block.shape[1]:
                break
            best = block.argmax(axis=1)
            best_similarity = block[np.arange(len(best)), best]
            better = best_similarity > self.similarities[start : start + QUERY_BLOCK]
            self.similarities[start : start + QUERY_BLOCK][better] = best_similarity[better]
            self.indices[start : start + QUERY_BLOCK][better] = best[better] + self.seen
        self.seen += len(references)


def nearest_neighbours(
    queries: np.ndarray, references: np.ndarray, block_rows: int = 2048
) -> tuple[np.ndarray, np.ndarray]:
    """Each query row's most similar reference row (index) and their cosine similarity."""
    search = NearestNeighbours(queries)
    for start in range(0, len(references), block_rows):
        search.add(references[start : start + block_rows])
    return search.indices, search.similarities


@dataclass(frozen=True)
class NearDuplicate:
    """A held-out image and its nearest training image, with their classes."""

    path: str
    label: str
    train_path: str
    train_label: str
    similarity: float


@dataclass(frozen=True)
class SplitCheck:
    """One held-out split against train: how many images, and those above the threshold, most similar first."""

    split: str
    images: int
    pairs: tuple[NearDuplicate, ...]
    # The similarity of every image to its nearest training image, in the split's file row order.
    similarities: np.ndarray


@dataclass(frozen=True)
class LeakageCheck:
    """The near-duplicate check of a dataset: the threshold and each checked split."""

    threshold: float
    train_images: int
    splits: dict[str, SplitCheck]

    def flagged(self, split: str) -> np.ndarray:
        """Which images of the split are flagged, in its file row order."""
        return self.splits[split].similarities >= self.threshold

    def to_dict(self) -> dict:
        """As the data report records it: per split, how many images, how many flagged, and the pairs."""
        return {
            "threshold": self.threshold,
            "train_images": self.train_images,
            "splits": {
                name: {
                    "images": check.images,
                    "flagged": len(check.pairs),
                    "pairs": [{**asdict(pair), "similarity": round(pair.similarity, 6)} for pair in check.pairs],
                }
                for name, check in self.splits.items()
            },
        }


def find_near_duplicates(
    features: "FeatureSet",
    class_names: list[str],
    threshold: float = DEFAULT_NEAR_DUPLICATE_THRESHOLD,
    splits: tuple[str, ...] = CHECKED_SPLITS,
) -> LeakageCheck:
    """Every image of `splits` against every training image, from the dataset's features file,
    one training row group at a time."""
    searches, queries = {}, {}
    for split in splits:  # one read of each held-out split: its features, labels and paths
        split_features, labels, paths = features.load(split)
        searches[split], queries[split] = NearestNeighbours(split_features), {"label": labels.tolist(), "path": paths}
    parquet = pq.ParquetFile(features.path)
    train_paths, train_labels = [], []
    for group in features.row_groups("train"):
        table = parquet.read_row_group(group, columns=["features", "label", "path"])
        block = features_matrix(table)
        for search in searches.values():
            search.add(block)
        train_paths += table.column("path").to_pylist()
        train_labels += table.column("label").to_pylist()
    checks = {}
    for split, search in searches.items():
        rows = queries[split]
        above = np.flatnonzero(search.similarities >= threshold)
        above = above[np.argsort(-search.similarities[above], kind="stable")]
        pairs = tuple(
            NearDuplicate(
                path=rows["path"][i],
                label=class_names[rows["label"][i]],
                train_path=train_paths[search.indices[i]],
                train_label=class_names[train_labels[search.indices[i]]],
                similarity=float(search.similarities[i]),
            )
            for i in above
        )
        checks[split] = SplitCheck(split, len(rows["path"]), pairs, search.similarities)
    return LeakageCheck(threshold, len(train_paths), checks)


def accuracy_with_and_without(labels: np.ndarray, probabilities: np.ndarray, flagged: np.ndarray) -> dict:
    """Accuracy on every image, and on those not flagged (None where every image is flagged)."""
    correct = np.asarray(probabilities).argmax(axis=1) == np.asarray(labels)
    kept = ~np.asarray(flagged, bool)
    return {
        "accuracy": float(correct.mean()) if len(correct) else 0.0,
        "n": int(len(correct)),
        "accuracy_without_flagged": float(correct[kept].mean()) if kept.any() else None,
        "n_without_flagged": int(kept.sum()),
    }


def near_duplicate_report(check: LeakageCheck, features: "FeatureSet", probabilities: np.ndarray) -> dict:
    """The check as the data report records it, with the test split's accuracy with and without
    its flagged images, from the test probabilities (in the split's file row order, as
    evaluation returns them)."""
    report = check.to_dict()
    labels, _ = features.labels_and_paths("test")
    report["splits"]["test"].update(accuracy_with_and_without(labels, probabilities, check.flagged("test")))
    return report
