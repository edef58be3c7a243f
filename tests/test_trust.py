"""Calibrated probabilities and the "unsure" answer: temperature scaling, the expected calibration
error, the threshold chosen for a target accuracy, and predictions that say "unsure"."""

from pathlib import Path

import numpy as np
import pyarrow.csv as pa_csv
import pytest
from feature_sets import sha, write_feature_set

from headstart.errors import HeadstartError
from headstart.evaluation.calibration import (
    confidence_and_correct,
    coverage_and_accuracy,
    expected_calibration_error,
    fit_temperature,
    softmax,
    threshold_for_accuracy,
)
from headstart.serving.predict import UNSURE, Predictions, Threshold, write_predictions


def _noisy_logits(count: int, temperature: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits, and labels drawn from softmax(logits / temperature): a model over-confident by that factor."""
    generator = np.random.default_rng(seed)
    logits = generator.normal(size=(count, 3)) * 4
    probabilities = softmax(logits / temperature)
    labels = np.array([generator.choice(3, p=row) for row in probabilities])
    return logits, labels


def test_the_fitted_temperature_is_the_one_the_labels_were_drawn_with():
    logits, labels = _noisy_logits(20_000, 2.5)
    assert fit_temperature(logits, labels) == pytest.approx(2.5, rel=0.05)
    logits, labels = _noisy_logits(20_000, 0.5, seed=1)
    assert fit_temperature(logits, labels) == pytest.approx(0.5, rel=0.05)


def test_calibration_lowers_the_error_of_an_over_confident_head_and_keeps_its_labels(tmp_path):
    """A head whose weights are scaled up tenfold says ~1.0 where it is right 79 % of the time:
    calibrating it on validation lowers the test split's calibration error, labels unchanged."""
    from headstart.evaluation.metrics import calibrate_classifier, split_logits, trust_metrics
    from headstart.training.head import rebuilt_head

    generator = np.random.default_rng(3)
    rows = []
    for index in range(900):
        label = int(generator.integers(2))
        features = generator.normal(size=4) + (0.8 if label else -0.8) * np.array([1, 0, 0, 0])
        rows.append((sha(f"image-{index}"), ("train", "validation", "test")[index % 3], label, features.tolist()))
    features = write_feature_set(tmp_path / "features.parquet", rows, ["cat", "dog"])
    # The Bayes direction, ten times too steep.
    kernel = np.zeros((4, 2), np.float32)
    kernel[0] = [-8.0, 8.0]
    classifier = rebuilt_head(kernel, np.zeros(2, np.float32))
    before = split_logits(classifier, features, "test")[0].argmax(axis=1)

    record = calibrate_classifier(classifier, features)
    trust = trust_metrics(classifier, features, record, target_accuracy=0.95)

    assert record["temperature"] > 3
    assert record["validation_ece_after"] < record["validation_ece_before"] / 3
    calibration = trust["calibration"]
    assert calibration["ece_after"] < calibration["ece_before"] / 3 and calibration["ece_before"] > 0.1
    assert (split_logits(classifier, features, "test")[0].argmax(axis=1) == before).all()
    assert trust["unsure"]["validation_accuracy"] >= 0.95 and 0 < trust["unsure"]["validation_coverage"] < 1


def test_a_split_without_validation_images_is_left_uncalibrated(tmp_path):
    from headstart.evaluation.metrics import calibrate_classifier, trust_metrics
    from headstart.training.head import rebuilt_head

    rows = [(sha(f"i{index}"), ("train", "test")[index % 2], index % 2, [index % 2, 1.0]) for index in range(20)]
    features = write_feature_set(tmp_path / "features.parquet", rows, ["cat", "dog"])
    classifier = rebuilt_head(np.array([[-3.0, 3.0], [0, 0]], np.float32), np.zeros(2, np.float32))
    record = calibrate_classifier(classifier, features)
    assert record == {"temperature": 1.0, "validation_images": 0}
    trust = trust_metrics(classifier, features, record, target_accuracy=0.9)
    assert (
        trust["unsure"]["threshold"] is None and trust["calibration"]["ece_before"] == trust["calibration"]["ece_after"]
    )


def test_the_threshold_keeps_as_many_images_as_reach_the_target_accuracy():
    generator = np.random.default_rng(5)
    confidence = np.round(generator.uniform(0.5, 1.0, size=3000), 3)  # ties, as a real model's rounding makes
    correct = generator.uniform(size=3000) < confidence
    for target in (0.8, 0.9, 0.95):
        threshold = threshold_for_accuracy(confidence, correct, target)
        coverage, accuracy = coverage_and_accuracy(confidence, correct, threshold)
        assert accuracy >= target and 0 < coverage < 1
        lower = confidence[confidence < threshold].max()  # the next threshold a user could set
        assert coverage_and_accuracy(confidence, correct, lower)[1] < target
    assert threshold_for_accuracy(np.array([0.9, 0.8]), np.array([False, True]), 0.99) is None


def test_expected_calibration_error_is_the_weighted_gap_per_bin():
    probabilities = np.array([[0.95, 0.05]] * 10 + [[0.35, 0.65]] * 10)
    labels = np.array([0] * 9 + [1] + [1] * 5 + [0] * 5)
    # bin 0.93–1.0: confidence 0.95, accuracy 0.9; bin 0.6–0.67: confidence 0.65, accuracy 0.5.
    assert expected_calibration_error(probabilities, labels) == pytest.approx((0.05 * 10 + 0.15 * 10) / 20)
    assert confidence_and_correct(probabilities, labels)[1].sum() == 14


def test_predictions_below_the_threshold_are_unsure_in_every_output(tmp_path):
    predictions = Predictions(
        ["cat", "dog"], ["a.jpg", "b.jpg", "c.jpg"], np.array([[0.9, 0.1], [0.45, 0.55], [0.2, 0.8]], np.float32)
    )
    assert [row["label"] for row in predictions.rows()] == ["cat", "dog", "dog"]
    assert not any(row["unsure"] for row in predictions.rows())
    predictions.threshold = 0.7
    rows = predictions.rows()
    assert [row["label"] for row in rows] == ["cat", UNSURE, "dog"]
    assert rows[1]["guess"] == "dog" and rows[1]["unsure"] and rows[1]["probability"] == pytest.approx(0.55)
    assert predictions.counts() == {"cat": 1, "dog": 1, UNSURE: 1}
    table = pa_csv.read_csv(write_predictions(predictions, tmp_path / "p.csv"))
    assert table.column("label").to_pylist() == ["cat", UNSURE, "dog"]
    assert table.column("unsure").to_pylist() == [False, True, False]


def test_a_target_accuracy_needs_a_run_and_a_reachable_threshold(tmp_path):
    with pytest.raises(HeadstartError, match="--target-accuracy needs a run's validation split"):
        Threshold(target_accuracy=0.9).for_file(Path("model.tflite"))
    assert Threshold(min_confidence=0.6).for_file(Path("model.tflite")) == 0.6


def test_a_trained_run_is_calibrated_and_its_predictions_say_unsure(
    prefect_harness, colour_folder, tiny_backbone_dir, tmp_path
):
    """The train flow calibrates, records the threshold for --target-accuracy and the figures;
    predict labels with it, or with --min-confidence, and says how many are unsure."""
    import pyarrow.parquet as pq

    from flows.train import train
    from headstart.config import TrainConfig
    from headstart.features.extraction import ExtractionSettings
    from headstart.registry.runs import CONFIDENCE_FILE, Run
    from headstart.serving.predict import predict_with_model

    config = TrainConfig.smoke(
        data=str(colour_folder),
        backbone=str(tiny_backbone_dir),
        artifacts_root=tmp_path / "artifacts",
        cache_dir=tmp_path / "cache",
        epochs=3,
        learning_rate=0.05,
        batch_size=8,
        test_fraction=0.25,
        validation_fraction=0.25,
        target_accuracy=0.9,
    )
    run = Run(train(**config.flat()))
    calibration, unsure = run.metrics["calibration"], run.metrics["unsure"]
    assert calibration["temperature"] != 1.0 and calibration["validation_images"] > 0
    assert {"ece_before", "ece_after", "reliability_before", "reliability_after"} <= set(calibration)
    assert unsure["target_accuracy"] == 0.9 and unsure["validation_accuracy"] >= 0.9
    assert run.unsure_threshold == unsure["threshold"]
    assert "## Probabilities" in run.model_card and "Temperature scaling" in run.model_card
    assert {"reliability.png", "coverage.png"} <= {png.name for png in run.plots()}
    # The saved head is the calibrated one: it gives the confidences the run recorded.
    confidences = pq.read_table(run.path / CONFIDENCE_FILE).to_pydict()
    assert set(confidences["split"]) == {"validation", "test"}
    confidence, _ = run.confidences("validation")
    assert len(confidence) == calibration["validation_images"]

    settings = ExtractionSettings("tensorflow", 1, 16)
    images = [colour_folder / "red", colour_folder / "blue"]
    everything, _ = predict_with_model(
        str(run.path), images, tmp_path / "artifacts", tmp_path / "cache", settings, Threshold(min_confidence=1.0)
    )
    assert everything.counts()[UNSURE] == len(everything.paths) == 48
    chosen, _ = predict_with_model(str(run.path), images, tmp_path / "artifacts", tmp_path / "cache", settings)
    assert chosen.threshold == run.unsure_threshold
    assert chosen.counts()[UNSURE] == int((chosen.probabilities.max(axis=1) < chosen.threshold).sum())
