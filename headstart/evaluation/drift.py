"""What changed in the data since the champion was trained: the drift note of a retrain.

Every run keeps a data index (each image's content hash, class and split) and a reference of
its training features (their mean, and their spread: the root-mean-square distance of a training
feature from that mean). A retrain compares its own data with the champion's: images per class,
how many are new and how many are gone, and how far the mean feature of its images moved from
the champion's training mean. That distance is given in units of the champion's spread, beside
what chance alone gives two independent random samples of those sizes from one distribution
(√(1/n + 1/m) spreads, m the champion's training images), so "moved" can be read without
knowing the feature space. (The whole set shares the champion's training images, so for it the
chance figure errs high.) Feature distances are only meaningful between the same backbone at the
same image size; otherwise the note says so instead. Sums run split by split in float64, so no
float64 copy of a dataset's features is ever held.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from headstart.data.manifest import SPLITS

if TYPE_CHECKING:
    from headstart.backbone.handles import Backbone
    from headstart.features.dataset import FeatureSet


def data_index(features: "FeatureSet", class_names: list[str]) -> pa.Table:
    """Each image of the dataset: content hash, class name and split."""
    columns: dict[str, list] = {"sha256": [], "class": [], "split": []}
    for split in SPLITS:
        rows = features.rows(split, ["sha256", "label"])
        columns["sha256"] += rows["sha256"]
        columns["class"] += [class_names[label] for label in rows["label"]]
        columns["split"] += [split] * len(rows["sha256"])
    return pa.table(columns)


@dataclass(frozen=True)
class FeatureReference:
    """A run's training features in brief, what a later run's drift note measures against: their
    mean and spread, under the backbone and image size that produced them."""

    backbone_fingerprint: str
    image_size: int
    images: int
    spread: float
    mean: tuple[float, ...]

    def to_dict(self) -> dict:
        return {
            "backbone_fingerprint": self.backbone_fingerprint,
            "image_size": self.image_size,
            "images": self.images,
            "spread": self.spread,
            "mean": list(self.mean),
        }

    @classmethod
    def from_dict(cls, written: dict) -> "FeatureReference":
        return cls(
            written["backbone_fingerprint"],
            written["image_size"],
            written["images"],
            written["spread"],
            tuple(written["mean"]),
        )


def feature_reference(features: "FeatureSet", backbone: "Backbone") -> FeatureReference:
    """The training split's mean feature and spread, under the backbone and size that produced them."""
    train = features.load("train")[0]
    mean = train.sum(axis=0, dtype=np.float64) / max(len(train), 1)
    # Mean squared distance from the mean = mean squared norm − squared norm of the mean.
    squared_norms = np.einsum("ij,ij->i", train, train, dtype=np.float64)
    spread = float(np.sqrt(max(squared_norms.mean() - mean @ mean, 0.0))) if len(train) else 0.0
    return FeatureReference(
        backbone_fingerprint=backbone.fingerprint,
        image_size=backbone.image_size,
        images=len(train),
        spread=spread,
        mean=tuple(float(f"{value:.7g}") for value in mean),
    )


def compare(
    champion: str,
    champion_index: pa.Table | None,
    reference: FeatureReference | None,
    index: pa.Table,
    features: "FeatureSet",
    backbone: "Backbone",
) -> dict:
    """The drift note of a candidate (its data index and features) against the champion's data
    (the champion's version, data index and feature reference)."""
    if champion_index is None:
        return {"note": f"champion {champion} was written before runs kept a data index: no comparison"}
    hashes, champion_hashes = set(index.column("sha256").to_pylist()), set(champion_index.column("sha256").to_pylist())
    counts, champion_counts = (
        Counter(index.column("class").to_pylist()),
        Counter(champion_index.column("class").to_pylist()),
    )
    new = hashes - champion_hashes
    note = {
        "champion": champion,
        "images": len(hashes),
        "champion_images": len(champion_hashes),
        "new_images": len(new),
        "images_gone": len(champion_hashes - hashes),
        "per_class": {
            name: {"images": counts.get(name, 0), "champion_images": champion_counts.get(name, 0)}
            for name in sorted(set(counts) | set(champion_counts))
        },
    }
    if (
        reference is None
        or reference.backbone_fingerprint != backbone.fingerprint
        or reference.image_size != backbone.image_size
    ):
        note["mean_feature_shift"] = None
        note["mean_feature_note"] = "the champion's features come from another backbone or image size: not comparable"
        return note
    note.update(_mean_shift(features, index, new, reference))
    return note


def _mean_shift(features: "FeatureSet", index: pa.Table, new: set[str], reference: FeatureReference) -> dict:
    """How far the mean feature of all this run's images, and of its new ones, lies from the
    champion's training mean, in units of the champion's spread; and what chance alone would give."""
    is_new = np.array(
        [sha in new for sha in index.column("sha256").to_pylist()], bool
    )  # in data_index's order: split by split
    total = new_total = 0.0
    images, start = 0, 0
    for split in SPLITS:
        matrix = features.load(split)[0]
        split_new = is_new[start : start + len(matrix)]
        total = total + matrix.sum(axis=0, dtype=np.float64)
        new_total = new_total + matrix[split_new].sum(axis=0, dtype=np.float64)
        images, start = images + len(matrix), start + len(matrix)
    champion_mean, spread = np.asarray(reference.mean, np.float64), reference.spread or 1.0
    new_images = int(is_new.sum())

    def shift(summed, count: int) -> float | None:
        return round(float(np.linalg.norm(summed / count - champion_mean) / spread), 4) if count else None

    def by_chance(count: int) -> float | None:
        return round(float(np.sqrt(1 / count + 1 / max(reference.images, 1))), 4) if count else None

    return {
        "mean_feature_shift": shift(total, images),
        "mean_feature_shift_by_chance": by_chance(images),
        "new_images_mean_feature_shift": shift(new_total, new_images),
        "new_images_shift_by_chance": by_chance(new_images),
    }


def summary(note: dict) -> str:
    """The note in one sentence."""
    if "champion" not in note:
        return note["note"]
    classes = ", ".join(f"{name} {c['images']} (was {c['champion_images']})" for name, c in note["per_class"].items())
    text = (
        f"{note['new_images']} new images, {note['images_gone']} gone since champion {note['champion']}; "
        f"per class: {classes}"
    )
    if note.get("mean_feature_shift") is None:
        return f"{text}; {note['mean_feature_note']}"
    text += (
        f"; mean feature moved {note['mean_feature_shift']} spreads (chance: {note['mean_feature_shift_by_chance']})"
    )
    if note.get("new_images_mean_feature_shift") is not None:
        text += (
            f", the new images' mean {note['new_images_mean_feature_shift']} "
            f"(chance: {note['new_images_shift_by_chance']})"
        )
    return text
