"""A flow's parameters are its config's fields: each one typed, constrained, described and overridable alone."""

import inspect
import os

import pytest


def test_the_train_flow_takes_every_config_field_with_its_description_and_bounds():
    from flows.train import train
    from headstart.config import TrainConfig

    schema = train.parameters.model_dump()
    assert list(schema["properties"]) == list(TrainConfig.options()) and schema["required"] == ["data"]
    image_size = schema["properties"]["image_size"]
    assert (image_size["default"], image_size["minimum"], image_size["maximum"]) == (160, 32, 512)
    assert all(schema["properties"][name].get("description") for name in TrainConfig.options())


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
            b"I0000 00:00:1.0  123 cudart_stub.cc:31] Could not find cuda drivers on your machine, "
            b"GPU will not be used.\n",
        )
        os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n")
        os.write(
            2,
            b"I0000 00:00:1.0  123 port.cc:153] oneDNN custom operations are on. "
            b"You may see slightly different numerical results\n",
        )
        os.write(2, b"a real error\n")
    with native_notices_dropped(1):  # the TFLite quantizer reports its settings on standard output
        os.write(
            1, b"fully_quantize: 0, inference_type: 6, input_inference_type: UINT8, output_inference_type: FLOAT32\n"
        )
        os.write(1, b"a real line\n")
    captured = capfd.readouterr()
    assert captured.err == "a real error\n" and captured.out == "a real line\n"


def test_a_new_option_is_one_field_that_shows_in_the_cli_the_flow_parameters_and_the_training_key():
    """The one place to add an option is its section: the command line, the deployment form (the
    flow's parameters) and the training key all follow from the field."""
    from pydantic import Field

    from flows.cli import build_parser
    from flows.parameters import parameters_from
    from headstart.config import HeadConfig, TrainConfig
    from headstart.registry.reuse import training_key

    class HeadWithWarmup(HeadConfig):
        warmup_epochs: int = Field(2, ge=0, le=10, description="epochs at a rising learning rate before the decay")

    class WithWarmup(TrainConfig):
        head: HeadWithWarmup = HeadWithWarmup()

    train = build_parser(WithWarmup).parse_args(["train", "--data", "photos", "--warmup-epochs", "4"])
    options = {name: value for name, value in vars(train).items() if name in WithWarmup.options()}
    assert WithWarmup(**options).head.warmup_epochs == 4
    assert "--warmup-epochs" in build_parser(WithWarmup)._subparsers._group_actions[0].choices["train"].format_help()

    def flow_body(**parameters) -> str:
        return ""

    signature = inspect.signature(parameters_from(WithWarmup)(flow_body))
    warmup = signature.parameters["warmup_epochs"]
    assert warmup.default == 2 and "rising learning rate" in flow_body.__doc__

    base = WithWarmup(data="photos")
    key = training_key(base, "m" * 16, "b" * 16)
    assert "warmup_epochs" in WithWarmup.counted_by_value()
    assert training_key(base.with_options(warmup_epochs=3), "m" * 16, "b" * 16) != key


def test_every_train_option_is_a_cli_option_with_its_flat_name():
    from flows.cli import build_parser
    from headstart.config import TrainConfig

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    # --no-prefect says where the command reports, not how the model trains: not a flow parameter.
    dests = {action.dest for action in train._actions} - {"help", "no_prefect"}
    assert dests == set(TrainConfig.options())
    switches = ["--no-reuse", "--no-gate", "--fine-tune", "--classes", "a,b"]
    parsed = build_parser().parse_args(["train", "--data", "d", *switches])
    parsed_values = (parsed.reuse_identical_runs, parsed.gate, parsed.fine_tune, parsed.classes)
    assert parsed_values == (False, False, True, ("a", "b"))
