"""Full-integer int8 conversion: ranges measured on the calibration images (ReLU6 ones ending at a
percentile), and channels equalized where they can be scaled."""

import numpy as np
import pytest

from headstart.edge.int8.quantization import full_integer
from headstart.infra.keras import keras, tf


def _int8_tensor(flatbuffer: bytes, operation: str, first: bool = False) -> tuple[float, int]:
    """(scale, zero point) of the output of the model's one `operation` (or its first one)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=flatbuffer)
    outputs = [details["outputs"][0] for details in interpreter._get_ops_details() if details["op_name"] == operation]
    assert first or len(outputs) == 1
    return interpreter.get_tensor_details()[outputs[0]]["quantization"]


def _converter(network, shape):
    @tf.function(input_signature=[tf.TensorSpec(shape, tf.float32)])
    def forward(values):
        return network(values, training=False)

    return tf.lite.TFLiteConverter.from_concrete_functions([forward.get_concrete_function()], network)


def _run(flatbuffer: bytes, batch: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=flatbuffer)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], batch)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


def test_the_private_converter_hooks_int8_relies_on_still_behave():
    """calibrate_then_quantize is headstart's one use of TensorFlow's private converter API (see its
    docstring). With `TFLiteConverter._experimental_calibrate_only` set, convert() must give the float
    model with every operation's output marked by a range; `tensorflow.lite.python.convert.mlir_quantize`
    must make that model int8 with the ranges set in between, the input type asked for and float
    output. A TensorFlow upgrade that changes either fails here, naming it."""
    from ai_edge_litert.schema_py_generated import BuiltinOperator, TensorType
    from tensorflow.lite.tools import flatbuffer_utils

    from headstart.edge.int8.quantization import calibrate_then_quantize
    from headstart.edge.int8.tflite_weights import operator_kind

    images = keras.Input((8, 8, 3))
    features = keras.layers.Conv2D(4, 3, padding="same", activation=tf.nn.relu6)(images)
    features = keras.layers.DepthwiseConv2D(3, padding="same")(features)
    network = keras.Model(images, keras.layers.Conv2D(2, 1)(features))
    batch = np.random.default_rng(0).uniform(0, 1, (1, 8, 8, 3)).astype(np.float32)
    convolutions = (BuiltinOperator.CONV_2D, BuiltinOperator.DEPTHWISE_CONV_2D)

    def set_ranges(marked: bytes) -> dict:
        model = flatbuffer_utils.convert_bytearray_to_object(marked)
        graph = model.subgraphs[0]
        ranges = [graph.tensors[operator.outputs[0]].quantization for operator in graph.operators]
        unmarked = [
            graph.tensors[operator.outputs[0]].name
            for operator, marks in zip(graph.operators, ranges)
            if marks is None or any(ends is None or len(ends) != 1 for ends in (marks.min, marks.max))
        ]
        kinds = [operator_kind(model, operator) for operator in graph.operators]
        types = {tensor.type for tensor in graph.tensors}
        assert not unmarked and kinds == [*convolutions, BuiltinOperator.CONV_2D] and types == {TensorType.FLOAT32}, (
            "with TFLiteConverter._experimental_calibrate_only set, convert() no longer gives the float model with "
            f"each operation's output marked by one range (unmarked: {unmarked}, operators {kinds}, tensor types "
            f"{sorted(types)}): calibrate_then_quantize relies on it"
        )
        first_output = graph.tensors[graph.operators[0].outputs[0]]
        first_output.quantization.min, first_output.quantization.max = [0.0], [5.1]
        return {"ranged": bytes(flatbuffer_utils.convert_object_to_bytearray(model))}

    converter = _converter(network, [1, 8, 8, 3])
    assert hasattr(converter, "_experimental_calibrate_only"), (
        "TFLiteConverter._experimental_calibrate_only is gone: int8 conversion (calibrate_then_quantize) relies on it"
    )
    (quantized,) = calibrate_then_quantize(converter, batch, set_ranges, tf.uint8).values()

    model = flatbuffer_utils.convert_bytearray_to_object(quantized)
    graph = model.subgraphs[0]
    layers = [operator for operator in graph.operators if operator_kind(model, operator) in convolutions]
    int8 = all(
        graph.tensors[tensor].type == TensorType.INT8
        for operator in layers
        for tensor in (operator.inputs[0], operator.inputs[1], operator.outputs[0])
    )
    ends = (graph.tensors[graph.inputs[0]].type, graph.tensors[graph.outputs[0]].type)
    scale = graph.tensors[layers[0].outputs[0]].quantization.scale  # the first convolution's, ranged 0–5.1
    assert len(layers) == 3 and int8 and ends == (TensorType.UINT8, TensorType.FLOAT32), (
        "tensorflow.lite.python.convert.mlir_quantize no longer makes the calibrated model int8 with a uint8 input "
        "and float32 output: calibrate_then_quantize relies on it"
    )
    assert scale is not None and scale[0] == pytest.approx(5.1 / 255, rel=1e-4), (
        f"tensorflow.lite.python.convert.mlir_quantize no longer quantizes with the ranges set before it "
        f"(a range of 0–5.1 became steps of {scale}): calibrate_then_quantize relies on it"
    )
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=quantized)
    interpreter.allocate_tensors()
    pixels = interpreter.get_input_details()[0]
    input_scale, zero_point = pixels["quantization"]
    interpreter.set_tensor(pixels["index"], np.round(batch / input_scale + zero_point).astype(np.uint8))
    interpreter.invoke()
    expected = network(batch).numpy()
    difference = np.abs(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]) - expected).max()
    assert difference < 0.05 * np.abs(expected).max(), "the int8 model no longer computes what the float one does"


def test_int8_ranges_of_relu6_outputs_end_at_a_percentile_not_at_a_rare_peak():
    """One outlier among the calibration values stretches a ReLU6 output's int8 range five times
    where the range ends at the maximum (the converter's own choice); ending at the 99.9th
    percentile, it ends where the values usually end, and no operation is added."""
    images = keras.Input((4, 4, 1))
    convolution = keras.layers.Conv2D(1, 1)
    network = keras.Model(images, keras.layers.ReLU(6.0)(convolution(images)))
    convolution.set_weights([np.ones((1, 1, 1, 1), np.float32), np.zeros(1, np.float32)])
    batches = [np.random.default_rng(seed).uniform(0, 1, (1, 4, 4, 1)).astype(np.float32) for seed in range(200)]
    batches[7][0, 2, 2, 0] = 5.0

    files = full_integer(_converter(network, [1, 4, 4, 1]), lambda: iter(batches), range_ends=(99.9, 100.0))
    (narrowed, stretched) = (
        (127 - zero_point) * scale
        for scale, zero_point in (_int8_tensor(files[end], "CONV_2D") for end in (99.9, 100.0))
    )
    assert 0.95 < narrowed < 1.05 and stretched > 4.9
    from ai_edge_litert.interpreter import Interpreter

    assert {details["op_name"] for details in Interpreter(model_content=files[99.9])._get_ops_details()} <= {
        "QUANTIZE",
        "CONV_2D",
        "DEQUANTIZE",
    }


def test_a_range_is_the_tensors_own_even_where_an_operation_after_it_works_in_place():
    """A convolution's output in [0, 4] is added to the input in [0, 1] (a residual sum, which the
    interpreter computes in place): the converter's calibration then records the convolution's
    range as the sum's, [0, 5]; measured, it stays [0, 4], and its int8 steps are 4/255."""
    images = keras.Input((4, 4, 1))
    convolution, after = keras.layers.Conv2D(1, 1), keras.layers.Conv2D(1, 1)
    network = keras.Model(images, after(keras.layers.Add()([convolution(images), images])))
    convolution.set_weights([np.full((1, 1, 1, 1), 4.0, np.float32), np.zeros(1, np.float32)])
    after.set_weights([np.ones((1, 1, 1, 1), np.float32), np.zeros(1, np.float32)])
    batches = [np.random.default_rng(seed).uniform(0, 1, (1, 4, 4, 1)).astype(np.float32) for seed in range(50)]
    batches[0][0, 0, 0, 0], batches[0][0, 0, 1, 0] = 0.0, 1.0

    (flatbuffer,) = full_integer(_converter(network, [1, 4, 4, 1]), lambda: iter(batches)).values()
    scale, _ = _int8_tensor(flatbuffer, "CONV_2D", first=True)
    assert scale == pytest.approx(4.0 / 255, rel=1e-3)


def test_a_narrow_channel_before_a_depthwise_convolution_keeps_its_precision(monkeypatch):
    """Two channels into a depthwise convolution, one a hundred times narrower than the other: with
    one int8 scale for both, the narrow one keeps about two steps; equalized, it keeps sixteen
    times as many, and the model still computes what the float model does."""
    import headstart.edge.int8.equalization

    images = keras.Input((6, 6, 2))
    convolution, depthwise = (
        keras.layers.Conv2D(2, 1, activation=keras.activations.relu),
        keras.layers.DepthwiseConv2D(3),
    )
    network = keras.Model(images, depthwise(keras.layers.ZeroPadding2D(1)(convolution(images))))
    convolution.set_weights([np.diag([5.0, 0.05]).astype(np.float32).reshape(1, 1, 2, 2), np.zeros(2, np.float32)])
    # The depthwise filter makes both of its outputs equally wide, so only its input's scale differs.
    filters = np.random.default_rng(0).normal(0, 1, (3, 3, 2, 1)) * np.array([1.0, 100.0])[:, np.newaxis]
    depthwise.set_weights([filters.astype(np.float32), np.zeros(2, np.float32)])
    batches = [np.random.default_rng(seed).uniform(0, 1, (1, 6, 6, 2)).astype(np.float32) for seed in range(50)]
    test = np.random.default_rng(99).uniform(0, 1, (1, 6, 6, 2)).astype(np.float32)
    narrow = network(test).numpy()[..., 1]

    def narrow_channel_error() -> float:
        (flatbuffer,) = full_integer(_converter(network, [1, 6, 6, 2]), lambda: iter(batches)).values()
        return float(np.abs(_run(flatbuffer, test)[..., 1] - narrow).max() / np.abs(narrow).max())

    equalized = narrow_channel_error()
    monkeypatch.setattr(headstart.edge.int8.equalization, "equalize", lambda model, pairs, maxima: 0)
    assert equalized < 0.05 and equalized * 4 < narrow_channel_error()


def test_a_narrow_channel_of_a_residual_sum_keeps_its_precision(monkeypatch):
    """A projection without activation, a second one after an expansion, and their sum, read by a
    convolution: all three tensors carry a channel a hundred times narrower than the other. They are
    scaled as one group (both projections alike, the readers' inputs divided back), so the narrow
    channel gets sixteen times the steps of its sum's one int8 scale, and the model still computes
    what the float model does."""
    import headstart.edge.int8.equalization

    images = keras.Input((6, 6, 2))
    first, expansion, second = (
        keras.layers.Conv2D(2, 1),
        keras.layers.Conv2D(4, 1, activation=keras.activations.relu),
        keras.layers.Conv2D(2, 1),
    )
    reader = keras.layers.Conv2D(2, 1, activation=keras.activations.relu)
    projected = first(images)
    network = keras.Model(images, reader(keras.layers.Add()([projected, second(expansion(projected))])))
    narrow = np.diag([5.0, 0.05]).astype(np.float32).reshape(1, 1, 2, 2)
    # Biases of their own: the converter would let equal ones share a buffer, and shared weights are left alone.
    first.set_weights([narrow, np.array([0.1, 0.001], np.float32)])
    expansion.set_weights(
        [np.random.default_rng(1).uniform(0.5, 1.5, (1, 1, 2, 4)).astype(np.float32), np.full(4, 0.2, np.float32)]
    )
    second.set_weights(
        [
            np.random.default_rng(2).uniform(0.1, 0.2, (1, 1, 4, 2)).astype(np.float32)
            * np.array([1.0, 0.01], np.float32),
            np.array([0.3, 0.003], np.float32),
        ]
    )
    # The reader makes both of its outputs equally wide, so only the sum's scale differs between them.
    reader.set_weights([np.diag([1.0, 100.0]).astype(np.float32).reshape(1, 1, 2, 2), np.array([0.4, 0.0], np.float32)])
    batches = [np.random.default_rng(seed).uniform(0, 1, (1, 6, 6, 2)).astype(np.float32) for seed in range(50)]
    test = np.random.default_rng(99).uniform(0, 1, (1, 6, 6, 2)).astype(np.float32)
    expected = network(test).numpy()[..., 1]
    found, scalable_channels = [], headstart.edge.int8.equalization.scalable_channels
    monkeypatch.setattr(
        headstart.edge.int8.equalization,
        "scalable_channels",
        lambda model: found.extend(scalable_channels(model)) or found,
    )

    def narrow_channel_error() -> float:
        (flatbuffer,) = full_integer(_converter(network, [1, 6, 6, 2]), lambda: iter(batches)).values()
        return float(np.abs(_run(flatbuffer, test)[..., 1] - expected).max() / np.abs(expected).max())

    equalized = narrow_channel_error()
    assert [(len(group.tensors), len(group.producers), len(group.readers)) for group in found] == [(3, 2, 2)]
    monkeypatch.setattr(headstart.edge.int8.equalization, "equalize", lambda model, groups, ranges: 0)
    assert equalized < 0.05 and equalized * 4 < narrow_channel_error()


def test_a_residual_sum_read_by_anything_but_a_convolution_is_left_as_it_is(monkeypatch):
    """A sum that a pooling reads (no filter there to divide a scaled channel back) is not scaled:
    the int8 model still computes the float model's values."""
    import headstart.edge.int8.equalization

    images = keras.Input((6, 6, 2))
    first, second = keras.layers.Conv2D(2, 1), keras.layers.Conv2D(2, 1)
    projected = first(images)
    network = keras.Model(
        images, keras.layers.GlobalAveragePooling2D()(keras.layers.Add()([projected, second(projected)]))
    )
    first.set_weights([np.diag([5.0, 0.05]).astype(np.float32).reshape(1, 1, 2, 2), np.array([0.1, 0.001], np.float32)])
    second.set_weights(
        [np.diag([0.5, 0.005]).astype(np.float32).reshape(1, 1, 2, 2), np.array([0.3, 0.003], np.float32)]
    )
    batches = [np.random.default_rng(seed).uniform(0, 1, (1, 6, 6, 2)).astype(np.float32) for seed in range(50)]
    found, scalable_channels = [], headstart.edge.int8.equalization.scalable_channels
    monkeypatch.setattr(
        headstart.edge.int8.equalization,
        "scalable_channels",
        lambda model: found.extend(scalable_channels(model)) or found,
    )

    (flatbuffer,) = full_integer(_converter(network, [1, 6, 6, 2]), lambda: iter(batches)).values()
    test = np.random.default_rng(99).uniform(0, 1, (1, 6, 6, 2)).astype(np.float32)
    assert found == []
    np.testing.assert_allclose(_run(flatbuffer, test), network(test).numpy(), atol=0.05)


def test_depthwise_taps_are_rounded_so_that_their_errors_cancel_on_smooth_images(monkeypatch):
    """On a constant image a 3×3 depthwise filter gives the pixel times the sum of its taps. Eight
    taps of 0.57 int8 steps, each rounded to its nearest step, add 3.4 steps to that sum; rounded so
    that their errors cancel on the calibration images, the sum stays within a step, and the largest
    tap keeps its 127 steps, so the converter's grid is the one they were rounded to."""
    import headstart.edge.int8.rounding

    images = keras.Input((8, 8, 1))
    depthwise = keras.layers.DepthwiseConv2D(3)
    network = keras.Model(images, depthwise(images))
    filters = np.full((3, 3, 1, 1), 0.57 / 127, np.float32)
    filters[1, 1] = 1.0
    depthwise.set_weights([filters, np.zeros(1, np.float32)])
    batches = [np.full((1, 8, 8, 1), value, np.float32) for value in np.linspace(0.0, 6.0, 40)]

    def taps_in_steps() -> np.ndarray:
        from ai_edge_litert.interpreter import Interpreter

        (flatbuffer,) = full_integer(_converter(network, [1, 8, 8, 1]), lambda: iter(batches)).values()
        interpreter = Interpreter(model_content=flatbuffer)
        interpreter.allocate_tensors()
        (operation,) = [
            details for details in interpreter._get_ops_details() if details["op_name"] == "DEPTHWISE_CONV_2D"
        ]
        return interpreter.get_tensor(operation["inputs"][1]).astype(np.int64)

    rounded = taps_in_steps()
    monkeypatch.setattr(headstart.edge.int8.rounding, "round_compensating", lambda model, batches: 0)
    nearest = taps_in_steps()
    assert nearest.sum() == 127 + 8 and nearest.max() == 127
    assert abs(rounded.sum() - (127 + 8 * 0.57)) <= 1.0 and rounded.max() == 127


def test_rounding_together_moves_a_convolutions_output_less_than_rounding_each_weight():
    """1×1 convolutions over inputs that move together (correlated channels): rounded with each
    error compensated in the weights after it, every weight is on its row's int8 grid, each row's
    largest keeps its 127 steps, and the output moves less than with each weight at its nearest
    step: never more than 0.8 times as far, on average less than half."""
    from headstart.edge.int8.rounding import round_rows

    ratios = []
    for seed in range(10):
        generator = np.random.default_rng(seed)
        inputs = (
            generator.normal(0, 1, (2000, 4)) @ generator.normal(0, 1, (4, 24)) + 2.0
        )  # 24 channels, rank 4, not centred
        rows = generator.normal(0, 1, (8, 24))
        steps = np.abs(rows).max(axis=1, keepdims=True) / 127
        rounded, nearest = round_rows(rows, inputs.T @ inputs), np.round(rows / steps) * steps
        assert (
            np.allclose(rounded / steps, np.round(rounded / steps), atol=1e-6)
            and np.abs(rounded / steps).max() <= 127 + 1e-6
        )
        assert np.allclose(np.abs(rounded).max(axis=1), np.abs(rows).max(axis=1))
        ratios.append(np.linalg.norm(inputs @ (rounded - rows).T) / np.linalg.norm(inputs @ (nearest - rows).T))
    assert max(ratios) < 0.8 and np.mean(ratios) < 0.5
