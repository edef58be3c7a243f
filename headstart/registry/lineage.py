"""A run's lineage record (lineage.json): where its model came from, for the registry.

The data (a count and one hash of the content hashes per split), the classes, the backbone, every
parameter, the headstart version, the flow run, the test scores, the promotion gate's decision and
a reference of the training features. Runs written before the gate or the drift note existed
lack those keys: they read as None.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from headstart.evaluation.drift import FeatureReference


@dataclass(frozen=True)
class SplitFingerprint:
    """A split's images as a count and one hash of their sorted content hashes."""

    images: int
    content_sha256: str

    @classmethod
    def of(cls, content_hashes: list[str]) -> "SplitFingerprint":
        return cls(len(content_hashes), hashlib.sha256("".join(sorted(content_hashes)).encode()).hexdigest())

    def to_dict(self) -> dict:
        return {"images": self.images, "content_sha256": self.content_sha256}

    @classmethod
    def from_dict(cls, written: dict) -> "SplitFingerprint":
        return cls(written["images"], written["content_sha256"])


@dataclass(frozen=True)
class DataLineage:
    """The source a run read and the images of each of its splits."""

    source: str
    splits: dict[str, SplitFingerprint]

    def to_dict(self) -> dict:
        return {"source": self.source, "splits": {name: split.to_dict() for name, split in self.splits.items()}}

    @classmethod
    def from_dict(cls, written: dict) -> "DataLineage":
        return cls(
            written["source"], {name: SplitFingerprint.from_dict(split) for name, split in written["splits"].items()}
        )


@dataclass(frozen=True)
class BackboneLineage:
    """The backbone a run's model holds: its handle, the fingerprint of its weights, its input size."""

    handle: str
    fingerprint: str
    image_size: int

    def to_dict(self) -> dict:
        return {"handle": self.handle, "fingerprint": self.fingerprint, "image_size": self.image_size}

    @classmethod
    def from_dict(cls, written: dict) -> "BackboneLineage":
        return cls(written["handle"], written["fingerprint"], written["image_size"])


@dataclass(frozen=True)
class Scores:
    """The model's accuracy and macro F1 on the test split, and the images scored."""

    accuracy: float
    n: int
    macro_f1: float

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy, "n": self.n, "macro_f1": self.macro_f1}

    @classmethod
    def from_dict(cls, written: dict) -> "Scores":
        return cls(written["accuracy"], written["n"], written["macro_f1"])


@dataclass(frozen=True)
class Lineage:
    """A run's lineage record. `parameters` are the run's flat options as it recorded them (older
    runs have options that no longer exist); `gate` is the promotion gate's decision as
    headstart.promotion.mcnemar.GateDecision.to_dict writes it, None where the gate was off;
    `reused_from` is the earlier run a copied run holds the files of."""

    version: str
    created_at: str
    headstart: str
    flow_run_id: str | None
    data: DataLineage
    class_names: list[str]
    backbone: BackboneLineage
    parameters: dict
    training_key: str
    metrics: Scores
    gate: dict | None = None
    feature_reference: FeatureReference | None = None
    reused_from: str | None = None

    def to_dict(self) -> dict:
        """The record as lineage.json holds it; `reused_from` only where the run is a copy."""
        written = {
            "version": self.version,
            "created_at": self.created_at,
            "headstart": self.headstart,
            "flow_run_id": self.flow_run_id,
            "data": self.data.to_dict(),
            "class_names": self.class_names,
            "backbone": self.backbone.to_dict(),
            "parameters": self.parameters,
            "training_key": self.training_key,
            "metrics": self.metrics.to_dict(),
            "gate": self.gate,
            "feature_reference": self.feature_reference.to_dict() if self.feature_reference is not None else None,
        }
        if self.reused_from is not None:
            written["reused_from"] = self.reused_from
        return written

    @classmethod
    def from_dict(cls, written: dict) -> "Lineage":
        reference = written.get("feature_reference")
        return cls(
            version=written["version"],
            created_at=written["created_at"],
            headstart=written["headstart"],
            flow_run_id=written["flow_run_id"],
            data=DataLineage.from_dict(written["data"]),
            class_names=written["class_names"],
            backbone=BackboneLineage.from_dict(written["backbone"]),
            parameters=written["parameters"],
            training_key=written["training_key"],
            metrics=Scores.from_dict(written["metrics"]),
            gate=written.get("gate"),
            feature_reference=FeatureReference.from_dict(reference) if reference is not None else None,
            reused_from=written.get("reused_from"),
        )


def copied_lineage(written: dict, version: str, created_at: str, flow_run_id: str | None, reused_from: str) -> dict:
    """The lineage.json of a copy of an earlier run: the earlier record as it was written, whatever
    keys the headstart that wrote it knew, under the copy's own version, time and flow run, and
    marked `reused_from` that run."""
    return {
        **written,
        "version": version,
        "created_at": created_at,
        "flow_run_id": flow_run_id,
        "reused_from": reused_from,
    }
