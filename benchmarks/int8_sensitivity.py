"""Study: which part of the network costs the int8 classifier its agreement? The run's int8 export is
quantized again with one group of layers at a time left in float32 (the converter's own
denylist, with quantize and dequantize operations around the group), and each file is compared
with the run's Keras model on the validation split: where one group held most of the loss, keeping
it in float would recover most of the agreement. The last row leaves every activation in float32
and keeps only the weights on their int8 grid: what the weights alone cost.

    uv run python benchmarks/int8_sensitivity.py RUN_DIR

Writes benchmarks/results/int8-sensitivity.md and prints it. The run is left as it is.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

# Groups of MobileNetV2 stages, by the stage names in the tensors' names.
GROUPS = {
    "normalisation (before the stem)": "input",
    "stem": "stem",
    "block 1": (1, 1),
    "blocks 2–3": (2, 3),
    "blocks 4–6": (4, 6),
    "blocks 7–10": (7, 10),
    "blocks 11–13": (11, 13),
    "blocks 14–16": (14, 16),
    "block 17": (17, 17),
    "head convolution, pooling and dense layer": "head",
    "normalisation to block 1": ("input", 1),
    "normalisation to block 3": ("input", 3),
}


def stage(name: str) -> str | int:
    """The stage an operation's output tensor belongs to: "input", "stem", a block number or "head"."""
    found = re.search(r"block(\d+)_", name)
    if found:
        return int(found.group(1))
    if "stem_" in name:
        return "stem"
    return (
        "head"
        if any(part in name for part in ("head_conv", "global_pool", "MatMul", "StatefulPartitionedCall"))
        else "input"
    )


def in_group(position: str | int, group) -> bool:
    order = {"input": -1, "stem": 0, "head": 18}
    rank = order.get(position, position)
    if isinstance(group, str):
        return position == group
    first, last = group
    return order.get(first, first) <= rank <= order.get(last, last)


def float_probabilities(flatbuffer: bytes, pixels: list[np.ndarray]) -> np.ndarray:
    """The probabilities a float model (float32 pixels in) gives the images, one at a time."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=flatbuffer)
    index, output, shape, probabilities = (
        interpreter.get_input_details()[0]["index"],
        interpreter.get_output_details()[0]["index"],
        None,
        [],
    )
    for image in pixels:
        if image.shape != shape:  # smaller images go in at their own size
            interpreter.resize_tensor_input(index, [1, *image.shape])
            interpreter.allocate_tensors()
            shape = image.shape
        interpreter.set_tensor(index, image[np.newaxis].astype(np.float32))
        interpreter.invoke()
        probabilities.append(interpreter.get_tensor(output))
    return np.concatenate(probabilities)


def main() -> None:
    from int8_error_by_layer import int8_and_its_float_model
    from tensorflow.lite.python.convert import mlir_quantize
    from tensorflow.lite.tools import flatbuffer_utils

    from headstart.edge import TFLiteClassifier, embed_labels, export_images, uint8_images
    from headstart.edge.export import mean_divergence
    from headstart.infra.keras import tf
    from headstart.registry.runs import Run

    run = Run(Path(sys.argv[1]))
    images = export_images(run)
    _, start, chosen = int8_and_its_float_model(run, images)
    model = flatbuffer_utils.convert_bytearray_to_object(start)
    names = [model.subgraphs[0].tensors[operator.outputs[0]].name.decode() for operator in model.subgraphs[0].operators]
    pixels = [image for _, image in uint8_images(images.validation, run.image_size)]
    serving = run.serving_model()
    expected = np.concatenate([serving(image[np.newaxis].astype(np.float32)) for image in pixels])

    def closeness(denylisted: list[str] | None) -> tuple[float, float]:
        if denylisted is None:  # the float model itself: weights on their int8 grid, activations float32
            probabilities = float_probabilities(start, pixels)
        else:
            flatbuffer = mlir_quantize(
                start, input_data_type=tf.uint8, output_data_type=tf.float32, denylisted_nodes=denylisted or None
            )
            with tempfile.TemporaryDirectory() as scratch:
                path = Path(scratch) / "model.tflite"
                path.write_bytes(embed_labels(flatbuffer, run.class_names, run.image_size, "sensitivity"))
                model = TFLiteClassifier(path)
                probabilities = np.concatenate([model([image]) for image in pixels])
        return float((probabilities.argmax(1) == expected.argmax(1)).mean()), mean_divergence(expected, probabilities)

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT, capture_output=True, text=True
    ).stdout.strip()
    lines = [
        f"# int8 with one part of the network left in float32 (run {run.path.name}, {run.image_size} px, "
        f"ReLU6 ranges at the {chosen['range_end_percentile']:g}th percentile, {len(pixels)} validation images, "
        f"commit {commit})",
        "",
        "| left in float32 | top-1 agreement with the Keras model | mean divergence |",
        "|---|---|---|",
    ]
    for label, group in [
        ("nothing (the int8 export)", ()),
        *GROUPS.items(),
        ("every activation (int8 weights only)", None),
    ]:
        agreement, divergence = closeness(
            None if group is None else [name for name in names if group and in_group(stage(name), group)]
        )
        lines.append(f"| {label} | {agreement:.2%} | {divergence:.4f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    (PROJECT / "benchmarks" / "results" / "int8-sensitivity.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
