"""Batch prediction's inputs and outputs: folders walked, bad files listed, top classes, CSV and Parquet."""

import numpy as np
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
from conftest import write_class_images

from headstart.errors import HeadstartError
from headstart.serving.predict import Predictions, list_images, write_predictions


def test_folders_are_walked_and_what_cannot_be_used_is_listed_with_its_reason(tmp_path):
    write_class_images(tmp_path / "photos", {"a": (10, 20, 30)}, per_class=2)
    (tmp_path / "photos" / "a" / "notes.txt").write_text("no")
    (tmp_path / "photos" / "a" / "cut.png").write_bytes(b"\x89PNG\r\n")
    (tmp_path / "photos" / ".hidden.png").write_bytes(b"")
    usable, skipped = list_images([tmp_path / "photos", tmp_path / "missing.jpg"])
    assert [path.name for path in usable] == ["000.png", "001.png"]
    reasons = {entry["path"].rsplit("/", 1)[-1]: entry["reason"] for entry in skipped}
    assert reasons["notes.txt"] == "not an image file" and reasons["missing.jpg"] == "file not found"
    assert reasons["cut.png"].startswith("cannot decode") and reasons[".hidden.png"] == "hidden file"


def _three_classes():
    return Predictions(
        ["cat", "dog", "fox"], ["x.jpg", "y.jpg"], np.array([[0.2, 0.3, 0.5], [0.7, 0.2, 0.1]], np.float32)
    )


def test_more_than_two_classes_list_the_top_ones(tmp_path):
    rows = _three_classes().rows()
    assert rows[0]["label"] == "fox" and [rows[0][f"top{rank}_label"] for rank in (1, 2, 3)] == ["fox", "dog", "cat"]
    assert rows[1]["top2_probability"] == pytest.approx(0.2)
    assert _three_classes().counts() == {"cat": 1, "dog": 0, "fox": 1}
    two = Predictions(["cat", "dog"], ["x.jpg"], np.array([[0.4, 0.6]], np.float32)).rows()
    assert list(two[0]) == ["path", "label", "probability", "unsure", "guess"]


def test_predictions_are_written_as_csv_or_parquet_and_nothing_else(tmp_path):
    write_predictions(_three_classes(), tmp_path / "p.csv")
    write_predictions(_three_classes(), tmp_path / "p.parquet")
    assert pa_csv.read_csv(tmp_path / "p.csv").column("label").to_pylist() == ["fox", "cat"]
    assert pq.read_table(tmp_path / "p.parquet").column("top1_label").to_pylist() == ["fox", "cat"]
    with pytest.raises(HeadstartError, match=".csv or .parquet"):
        write_predictions(_three_classes(), tmp_path / "p.xlsx")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["p.csv", "p.parquet"]


def test_inputs_with_nothing_to_label_are_one_line():
    from headstart.serving.predict import check_inputs, require_images

    with pytest.raises(HeadstartError, match=r"^no image to label: /no/such, /nor/this not found; give image"):
        check_inputs(("/no/such", "/nor/this"))
    check_inputs(("/no/such", "/"))  # one of them is there: its images are labelled, the other listed as skipped
    nothing = Predictions(["cat", "dog"], skipped=[{"path": "/x/a.txt", "reason": "not an image file"}])
    with pytest.raises(HeadstartError, match=r"^no image to label in /x \(/x/a.txt: not an image file\); give"):
        require_images(nothing, ["/x"])
    require_images(Predictions(["cat", "dog"], ["x.jpg"], np.array([[0.4, 0.6]], np.float32)), ["/x"])


def test_a_run_given_no_output_keeps_its_labels_under_the_artifacts_root_without_overwriting(tmp_path):
    from datetime import datetime, timezone

    from headstart.serving.predict import default_output

    first = default_output(tmp_path, "calm-fox", datetime(2026, 12, 4, 3, 0, 5, tzinfo=timezone.utc))
    assert first == tmp_path / "predictions" / "20261204-030005-calm-fox.csv"
    assert default_output(tmp_path, "calm-fox", datetime(2026, 12, 4, 3, 0, 6, tzinfo=timezone.utc)) != first


def test_the_dashboard_table_lists_each_image_then_the_skipped_ones_capped():
    from tasks.prediction import prediction_rows

    predictions = _three_classes()
    predictions.skipped = [{"path": "z.jpg", "reason": "file not found"}]
    rows, left_out = prediction_rows(predictions)
    assert left_out == 0 and rows == [
        {"path": "x.jpg", "label": "fox", "probability": 0.5},
        {"path": "y.jpg", "label": "cat", "probability": 0.7},
        {"path": "z.jpg", "label": "(skipped: file not found)", "probability": None},
    ]
    rows, left_out = prediction_rows(predictions, limit=2)
    assert [row["path"] for row in rows] == ["x.jpg", "y.jpg"] and left_out == 1
