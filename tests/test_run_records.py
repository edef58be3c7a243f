"""A run directory's records: the typed records write exactly the JSON that the dicts they replaced
wrote (every key, every value, every byte), and read back what older headstart versions wrote,
which lacks the keys added since."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from headstart import __version__
from headstart.backbone.handles import Backbone
from headstart.config import TrainConfig
from headstart.evaluation.drift import FeatureReference
from headstart.promotion.mcnemar import GateDecision
from headstart.registry import run_writer
from headstart.registry.lineage import Lineage
from headstart.registry.runs import Run
from headstart.reporting.dashboard import report_markdown
from headstart.training.fine_tuning import FineTuningResult, FineTuningSummary

FIXTURES = Path(__file__).parent / "fixtures"
CLASSES = ["cat", "dog"]


class _Features:
    """A FeatureSet stand-in: six images' hashes, labels and two-number features."""

    engine, extracted, reused = "litert", 4, 2
    split_rows = {"train": (["a1", "a2", "a3", "a4"], [0, 0, 1, 1]), "validation": (["b1"], [1]), "test": (["c1"], [0])}

    def rows(self, split, columns):
        hashes, labels = self.split_rows[split]
        every = {"sha256": hashes, "label": labels, "path": [f"/d/{sha}.png" for sha in hashes]}
        return {column: every[column] for column in columns}

    def content_hashes(self):
        return {split: self.rows(split, ["sha256"])["sha256"] for split in self.split_rows}

    def load(self, split):
        hashes, labels = self.split_rows[split]
        return np.arange(len(hashes) * 2, dtype=np.float32).reshape(-1, 2) / 4, np.array(labels), []


CONFIG = TrainConfig(
    data="photos", learning_rate=0.002, batch_size=16, seed=3, dropout=0.1, fine_tune_learning_rate=0.0003
)
BACKBONE = Backbone("bundled:mobilenet_v2_100", Path("/nowhere"), "0123456789abcdef", 32)
METRICS = {
    "accuracy": 0.5,
    "n": 2,
    "macro_f1": 0.3333333333333333,
    "class_names": CLASSES,
    "per_class": {
        "cat": {"precision": 0.5, "recall": 1.0, "f1": 0.6666666666666666, "support": 1},
        "dog": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1},
    },
    "confusion_matrix": [[1, 0], [1, 0]],
}
DATA_REPORT = {
    "source": "photos",
    "class_names": CLASSES,
    "counts": {"train": {"cat": 2, "dog": 2}, "validation": {"cat": 0, "dog": 1}, "test": {"cat": 1, "dog": 1}},
    "skipped": [{"path": "/d/broken.png", "reason": "truncated"}],
    "notes": ["class 'cat' has no validation images"],
}
NEAR_DUPLICATES = {
    "threshold": 0.97,
    "splits": {
        "test": {
            "images": 2,
            "flagged": 1,
            "pairs": [
                {
                    "path": "/d/c1.png",
                    "label": "cat",
                    "train_path": "/d/a1.png",
                    "train_label": "cat",
                    "similarity": 0.99,
                }
            ],
            "accuracy": 0.5,
            "accuracy_without_flagged": 0.0,
            "n_without_flagged": 1,
        },
        "validation": {"images": 1, "flagged": 0, "pairs": []},
    },
}
HISTORY = {
    "loss": [1.0, 0.8, 0.7],
    "accuracy": [0.25, 0.5, 0.75],
    "val_loss": [1.1, 0.9, 0.9],
    "val_accuracy": [0.0, 1.0, 1.0],
}
FINE_TUNING_HISTORY = {
    "loss": [0.7, 0.5],
    "accuracy": [0.5, 0.75],
    "val_loss": [0.9, 0.8, 0.6],
    "val_accuracy": [0.5, 0.5, 1.0],
    "seconds": [1.5, 1.25],
}
GATE = GateDecision(True, "first model: accuracy 0.5000 ≥ floor", 2, 0.5, floor=0.4, notes=["all 2 test images"])

# What the code before the typed records wrote for these inputs: metrics.json's `fine_tuning` and
# lineage.json (less `version`, `created_at` and `parameters`, which are the run's own).
FINE_TUNING_WRITTEN = {
    "from_stage": 14,
    "image_size": 32,
    "activation_shape": [1, 1, 160],
    "activation_dtype": "float16",
    "flip": True,
    "shift": 0.1,
    "shift_cells": 1,
    "mixup": 0.2,
    "cutmix": 1.0,
    "mirror_average": True,
    "epochs_run": 2,
    "best_epoch": 2,
    "validation_accuracy_before": 0.5,
    "validation_accuracy_after": 1.0,
    "seconds_per_epoch": 1.375,
    "activations": {"computed": 9, "reused": 0, "seconds": 0.25},
    "base_backbone": {"handle": "bundled:mobilenet_v2_100", "fingerprint": "fedcba9876543210"},
    "left_out": [["d1", "/d/d1.png", "file changed since the scan"]],
}
LINEAGE_WRITTEN = {
    "headstart": __version__,
    "flow_run_id": "flow-1",
    "data": {
        "source": "photos",
        "splits": {
            "train": {
                "images": 4,
                "content_sha256": "8773fc929ba024665872756886de2240adb889c89d8c55e86c5ea0a2a1e97e7e",
            },
            "validation": {
                "images": 1,
                "content_sha256": "7dc96f776c8423e57a2785489a3f9c43fb6e756876d6ad9a9cac4aa4e72ec193",
            },
            "test": {
                "images": 1,
                "content_sha256": "d0f631ca1ddba8db3bcfcb9e057cdc98d0379f1bee00e75a545147a27dadd982",
            },
        },
    },
    "class_names": CLASSES,
    "backbone": {"handle": "bundled:mobilenet_v2_100", "fingerprint": "0123456789abcdef", "image_size": 32},
    "training_key": "k" * 20,
    "metrics": {"accuracy": 0.5, "n": 2, "macro_f1": 0.3333333333333333},
    "gate": {
        "promote": True,
        "reason": "first model: accuracy 0.5000 ≥ floor",
        "images": 2,
        "candidate_accuracy": 0.5,
        "champion_accuracy": None,
        "champion": None,
        "candidate_only_wrong": None,
        "candidate_only_right": None,
        "p_value": None,
        "tolerance": None,
        "alpha": None,
        "floor": 0.4,
        "notes": ["all 2 test images"],
        "drift": None,
        "measure": "accuracy",
    },
    "feature_reference": {
        "backbone_fingerprint": "0123456789abcdef",
        "image_size": 32,
        "images": 4,
        "spread": 0.7905694150420949,
        "mean": [0.75, 1.0],
    },
}
# What the first runs that kept them wrote: a summary before mixup, shifts as shares of the side,
# CutMix and mirror averaging; a lineage before the gate and the feature reference.
FIRST_FINE_TUNING = {
    key: value
    for key, value in FINE_TUNING_WRITTEN.items()
    if key not in ("shift_cells", "mixup", "cutmix", "mirror_average")
}
FIRST_LINEAGE = {
    "version": "20261201-221500-abcdef",
    "created_at": "2026-12-01T22:15:00+00:00",
    "parameters": {"epochs": 5},
    **{key: value for key, value in LINEAGE_WRITTEN.items() if key not in ("gate", "feature_reference")},
}


def _as_written(value) -> str:
    """A JSON file's text as headstart writes it (headstart.infra.storage.write_json_atomic)."""
    return json.dumps(value, indent=2, sort_keys=True) + "\n"


@pytest.fixture
def write(tmp_path, monkeypatch):
    """write_run with the fixture's inputs, its models left out (they are not records)."""
    monkeypatch.setattr(run_writer.RunWriter, "save_classifier", lambda writer, classifier, backbone: None)
    monkeypatch.setattr(run_writer, "confidence_table", lambda classifier, features: pa.table({"confidence": [0.5]}))

    def written(**options) -> Path:
        return run_writer.write_run(
            tmp_path / "artifacts",
            config=CONFIG,
            training_key="k" * 20,
            classifier=None,
            backbone=BACKBONE,
            features=_Features(),
            data_report=DATA_REPORT,
            history=HISTORY,
            metrics=METRICS,
            figures={"confusion_matrix.png": b"\x89PNG"},
            **options,
        )

    return written


def test_a_run_directory_holds_byte_for_byte_what_it_held_before_the_typed_records(write):
    summary = FineTuningSummary.from_dict(FINE_TUNING_WRITTEN)
    run = write(
        flow_run_id="flow-1",
        gate=GATE.to_dict(),
        near_duplicates=NEAR_DUPLICATES,
        fine_tuning=FineTuningResult(BACKBONE, FINE_TUNING_HISTORY, summary),
    )
    lineage = json.loads((run / "lineage.json").read_text())
    assert (run / "lineage.json").read_text() == _as_written(
        {
            **LINEAGE_WRITTEN,
            "version": run.name,
            "created_at": lineage["created_at"],
            "parameters": CONFIG.flat(),
        }
    )
    assert (run / "metrics.json").read_text() == _as_written(
        {
            **METRICS,
            "near_duplicates": {
                "threshold": 0.97,
                "flagged": 1,
                "accuracy_without_flagged": 0.0,
                "n_without_flagged": 1,
            },
            "fine_tuning": FINE_TUNING_WRITTEN,
            "engine": "litert",
            "features_extracted": 4,
            "features_reused": 2,
        }
    )
    assert (run / "history.json").read_text() == _as_written({**HISTORY, "fine_tuning": FINE_TUNING_HISTORY})
    assert (run / "data_report.json").read_text() == _as_written({**DATA_REPORT, "near_duplicates": NEAR_DUPLICATES})
    assert (run / "config.json").read_text() == _as_written(
        {**CONFIG.flat(), "backbone_fingerprint": BACKBONE.fingerprint, "training_key": "k" * 20}
    )
    assert (run / "class_names.json").read_text() == _as_written(CLASSES)
    assert (run / "MODEL_CARD.md").read_text() == (FIXTURES / "model_card_fine_tuned.md").read_text()
    read = Run(run)
    assert read.lineage == Lineage.from_dict(lineage) and read.lineage.to_dict() == lineage
    assert read.fine_tuning == summary and read.fine_tuning.to_dict() == FINE_TUNING_WRITTEN


def test_a_run_without_fine_tuning_or_gate_writes_them_as_before(write):
    run = write()
    lineage = json.loads((run / "lineage.json").read_text())
    assert lineage["gate"] is None and lineage["flow_run_id"] is None and "reused_from" not in lineage
    assert "fine_tuning" not in json.loads((run / "metrics.json").read_text())
    card = (run / "MODEL_CARD.md").read_text()
    assert "), frozen, ImageNet-pretrained" in card and "Fine-tuned:" not in card
    assert "## Near-duplicates of training images\nNot checked.\n" in card
    assert Run(run).fine_tuning is None and Run(run).lineage.gate is None


def _continued_lines(markdown: str) -> list[str]:
    """Lines that carry on the line above them, which the dashboard's markdown shows as a line break
    in the middle of a sentence: any text line right after a paragraph or list item."""
    lines = markdown.splitlines()
    starts_a_block = ("#", "- ", "|")
    return [
        line
        for above, line in zip(lines, lines[1:])
        if line.strip() and above.strip() and not above.startswith(("#", "|")) and not line.startswith(starts_a_block)
    ]


def test_every_paragraph_and_list_item_of_the_model_card_is_one_line(write):
    frozen = (write() / "MODEL_CARD.md").read_text()
    fine_tuned = (FIXTURES / "model_card_fine_tuned.md").read_text()
    assert _continued_lines(frozen) == _continued_lines(fine_tuned) == []
    assert _continued_lines("A sentence cut\nin two.\n\n- an item\n  carried on\n") == ["in two.", "  carried on"]
    assert "drawings, tiny thumbnails upscaled from" in frozen


def test_records_written_by_earlier_versions_read_with_the_newer_keys_at_their_defaults():
    summary = FineTuningSummary.from_dict(FIRST_FINE_TUNING)
    assert (summary.shift_cells, summary.mixup, summary.cutmix, summary.mirror_average) == (None, 0.0, 0.0, False)
    assert summary.activations.computed == 9 and summary.base_backbone.fingerprint == "fedcba9876543210"
    assert summary.left_out[0].path == "/d/d1.png" and summary.activation_shape == (1, 1, 160)
    lineage = Lineage.from_dict(FIRST_LINEAGE)
    assert lineage.gate is None and lineage.feature_reference is None and lineage.reused_from is None
    assert lineage.data.splits["train"].images == 4 and lineage.metrics.accuracy == 0.5
    assert lineage.backbone.image_size == 32 and lineage.parameters == {"epochs": 5}
    first_gate = {key: value for key, value in LINEAGE_WRITTEN["gate"].items() if key not in ("notes", "drift")}
    assert GateDecision.from_dict(first_gate) == GateDecision(
        True, "first model: accuracy 0.5000 ≥ floor", 2, 0.5, floor=0.4
    )
    reference = FeatureReference.from_dict(LINEAGE_WRITTEN["feature_reference"])
    assert reference.to_dict() == LINEAGE_WRITTEN["feature_reference"] and reference.mean == (0.75, 1.0)


def test_an_earlier_run_reads_and_reports_and_its_copy_keeps_its_records_as_written(write, tmp_path):
    """A run from before the gate, the feature reference and the newer fine-tuning options: read,
    reported on, and copied without gaining keys."""
    earlier = write()
    (earlier / "lineage.json").write_text(_as_written(FIRST_LINEAGE))
    metrics = json.loads((earlier / "metrics.json").read_text())
    (earlier / "metrics.json").write_text(_as_written({**metrics, "fine_tuning": FIRST_FINE_TUNING}))
    run = Run(earlier)
    assert run.lineage.created_at == "2026-12-01T22:15:00+00:00" and run.fine_tuning.mixup == 0.0
    report = report_markdown(run, "a-host")
    assert "**Fine-tuned** from stage 14 in 2 epochs (epoch 2 kept)" in report and "**Gate:**" not in report

    copy = run_writer.copy_run(tmp_path / "elsewhere", earlier, "flow-2")
    copied = json.loads((copy / "lineage.json").read_text())
    assert copied == {
        **FIRST_LINEAGE,
        "version": copy.name,
        "created_at": copied["created_at"],
        "flow_run_id": "flow-2",
        "reused_from": str(earlier),
    }
    assert Run(copy).lineage.reused_from == str(earlier) and Run(copy).lineage.gate is None
    assert (copy / "metrics.json").read_text() == (earlier / "metrics.json").read_text()


def test_a_run_written_before_runs_kept_a_lineage_reads_as_having_none(write):
    run = write()
    (run / "lineage.json").unlink()
    assert Run(run).lineage is None
    assert "**Gate:**" not in report_markdown(Run(run), "a-host")
