"""The sectioned configuration: built from flat options or from sections, written back flat."""

import pytest
from pydantic import ValidationError

from headstart.config import FineTuningConfig, HeadConfig, TrainConfig


def test_flat_options_and_sections_build_the_same_config():
    flat = TrainConfig(data="photos", epochs=5, fine_tune=True, fine_tune_epochs=2, gate=False, export="tflite")
    sectioned = TrainConfig(
        data={"data": "photos"},
        head=HeadConfig(epochs=5),
        fine_tuning=FineTuningConfig(enabled=True, epochs=2),
        gate={"enabled": False},
        export={"format": "tflite"},
    )
    assert flat == sectioned
    assert (flat.head.epochs, flat.fine_tuning.epochs, flat.gate.enabled, flat.export.format) == (5, 2, False, "tflite")


def test_the_flat_options_round_trip_and_keep_their_names():
    config = TrainConfig(data="photos", classes=("a", "b"), fine_tune_from=6, extraction_batch_size=8)
    flat = config.flat()
    assert set(flat) == set(TrainConfig.options())
    assert (flat["data"], flat["classes"], flat["fine_tune_from"], flat["extraction_batch_size"]) == (
        "photos", ["a", "b"], 6, 8,
    )  # fmt: skip
    assert TrainConfig(**flat) == config
    assert config.with_options(epochs=9).head.epochs == 9 and config.head.epochs == 30


def test_an_unknown_option_is_named_and_a_bad_value_is_checked_in_its_section():
    with pytest.raises(ValidationError, match="no_such_option"):
        TrainConfig(data="photos", no_such_option=1)
    with pytest.raises(ValidationError, match="epochs"):
        TrainConfig(data="photos", epochs=0)


def test_settings_that_cannot_run_together_are_refused_across_sections():
    with pytest.raises(ValidationError, match="validation fraction above 0"):
        TrainConfig(data="photos", fine_tune=True, validation_fraction=0.0)
    with pytest.raises(ValidationError, match="bundled backbone"):
        TrainConfig(data="photos", fine_tune=True, backbone="/a/savedmodel")
