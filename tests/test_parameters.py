"""A flow's parameters are its config's fields: each one typed, constrained, described and overridable alone."""

import os

import pytest


def test_the_train_flow_takes_every_config_field_with_its_description_and_bounds():
    from flows.train import train
    from headstart.config import TrainConfig

    schema = train.parameters.model_dump()
    assert list(schema["properties"]) == list(TrainConfig.model_fields) and schema["required"] == ["data"]
    image_size = schema["properties"]["image_size"]
    assert (image_size["default"], image_size["minimum"], image_size["maximum"]) == (160, 32, 512)
    assert all(schema["properties"][name].get("description") for name in TrainConfig.model_fields)


def test_flow_parameters_are_validated_like_the_config():
    from prefect.exceptions import ParameterTypeError, SignatureMismatchError

    from flows.predict import predict

    assert predict.validate_parameters({"inputs": ["a.jpg"], "batch_size": "8"})["batch_size"] == 8
    with pytest.raises(ParameterTypeError, match="batch_size"):
        predict.validate_parameters({"inputs": ["a.jpg"], "batch_size": 0})
    with pytest.raises(SignatureMismatchError, match="no_such_field"):
        predict.validate_parameters({"inputs": ["a.jpg"], "no_such_field": 1})


def test_native_start_up_notices_are_dropped_and_every_other_line_kept(capfd):
    from headstart.infra.native_logs import native_notices_dropped

    with native_notices_dropped():
        os.write(
            2,
            b"I0000 00:00:1.0  123 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.\n",
        )
        os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n")
        os.write(
            2,
            b"I0000 00:00:1.0  123 port.cc:153] oneDNN custom operations are on. You may see slightly different numerical results\n",
        )
        os.write(2, b"a real error\n")
    with native_notices_dropped(1):  # the TFLite quantizer reports its settings on standard output
        os.write(
            1, b"fully_quantize: 0, inference_type: 6, input_inference_type: UINT8, output_inference_type: FLOAT32\n"
        )
        os.write(1, b"a real line\n")
    captured = capfd.readouterr()
    assert captured.err == "a real error\n" and captured.out == "a real line\n"
