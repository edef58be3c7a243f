"""What a run shows: the metrics table (same columns in every row) and the terminal report."""

import numpy as np

from headstart.evaluation.metrics import classification_metrics, format_metrics
from headstart.promotion.mcnemar import GateDecision
from headstart.reporting.dashboard import DATA_TABLE_FILES, data_rows, gate_rows, metrics_rows


def _metrics():
    return classification_metrics(
        np.array([0, 0, 1, 1]), np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.1, 0.9]]), ["cat", "dog"]
    )


def test_every_row_of_the_metrics_table_has_the_same_columns_and_the_last_one_the_accuracy():
    rows = metrics_rows(_metrics())
    columns = ["class", "precision", "recall", "f1", "support", "accuracy", "balanced_accuracy"]
    assert [list(row) for row in rows] == [columns] * 3
    assert rows[-1]["class"] == "(all)" and rows[-1]["accuracy"] == 0.75 and rows[-1]["support"] == 4
    assert rows[-1]["balanced_accuracy"] == _metrics()["balanced_accuracy"]


def test_the_terminal_report_keeps_its_columns_apart_for_short_class_names():
    lines = format_metrics(_metrics()).splitlines()
    assert lines[2].startswith("class  precision")
    assert lines[3].startswith("cat    1.0000")


def test_the_gate_table_holds_short_figures_and_its_description_the_sentences():
    drift_note = {
        "champion": "v1",
        "new_images": 12,
        "images_gone": 0,
        "per_class": {"cat": {"images": 30, "champion_images": 24}},
        "mean_feature_shift": 0.42,
        "mean_feature_shift_by_chance": 0.2,
    }
    decision = GateDecision(
        False,
        "kept champion v1: …",
        12,
        0.5,
        1.0,
        "v1",
        6,
        0,
        1 / 64,
        0.0,
        0.05,
        notes=["all 12 test images"],
        drift=drift_note,
    )
    rows, description = gate_rows(decision)
    assert rows[0] == {"figure": "decision", "value": "keep the champion"}
    assert {row["figure"] for row in rows} >= {
        "candidate_accuracy",
        "champion_accuracy",
        "candidate_only_wrong",
        "p_value",
        "drift: new_images",
        "drift: mean_feature_shift",
    }
    assert all(list(row) == ["figure", "value"] for row in rows)
    # Sentences would stretch the table wider than the dashboard's pane.
    assert all(len(str(row["value"])) <= 20 for row in rows)
    assert description.splitlines() == [
        "kept champion v1: …",
        "- all 12 test images",
        "- drift: 12 new images, 0 gone since champion v1; per class: cat 30 (was 24); "
        "mean feature moved 0.42 spreads (chance: 0.2)",
    ]
    assert gate_rows(GateDecision(True, "first model: accuracy 0.9000 ≥ floor", 4, 0.9, floor=0.4))[1] == (
        "first model: accuracy 0.9000 ≥ floor"
    )


def test_the_data_table_lists_each_file_left_out_with_its_reason_and_counts_the_rest():
    skipped = [{"path": f"cat/{i}.jpg", "reason": "truncated"} for i in range(DATA_TABLE_FILES + 3)]
    rows = data_rows({"skipped": skipped, "notes": ["class 'dog' has no test images"]})
    assert rows[0] == {"file": "cat/0.jpg", "reason": "truncated"} and len(rows) == DATA_TABLE_FILES + 2
    assert rows[-2] == {"file": "(3 more files)", "reason": "listed in data_report.json"}
    assert rows[-1] == {"file": "(note)", "reason": "class 'dog' has no test images"}
    assert data_rows({"skipped": [], "notes": []}) == [{"file": "(none)", "reason": "every file was used"}]


def test_the_near_duplicates_table_lists_every_pair_with_the_same_columns_or_says_there_are_none():
    from headstart.reporting.dashboard import near_duplicate_rows

    pair = {
        "path": "/d/test/cat/1.jpg",
        "label": "cat",
        "train_path": "/d/train/dog/2.jpg",
        "train_label": "dog",
        "similarity": 0.912345,
    }
    flagged = {
        "threshold": 0.88,
        "splits": {"test": {"pairs": [pair]}, "validation": {"pairs": [{**pair, "similarity": 0.9}]}},
    }
    rows = near_duplicate_rows(flagged)
    assert [(row["split"], row["similarity"], row["its_class"]) for row in rows] == [
        ("test", 0.9123, "dog"),
        ("validation", 0.9, "dog"),
    ]
    assert len({tuple(row) for row in rows}) == 1
    (none,) = near_duplicate_rows({"threshold": 0.88, "splits": {"test": {"pairs": []}, "validation": {"pairs": []}}})
    assert none["image"] == "no near-duplicates at or above 0.88" and list(none) == list(rows[0])
