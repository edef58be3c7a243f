"""Study: where does the int8 classifier part from the float one? The run's int8 file (as `headstart
export` makes it) and the float model it was quantized from (the converter's, with its channels
equalized: headstart.edge.int8.equalization scales some tensors channel by channel, so the float32 export's
tensors would not compare; and its weights already on their int8 grid, headstart.edge.int8.rounding, so what
differs is the activations' quantization) run on the same test images with every intermediate tensor kept; each
activation tensor of the int8 file, dequantized, is compared with the float tensor of the same
name: signal-to-noise ratio 10·log10(Σ float² / Σ (int8 − float)²), in the order the network
computes them.

    uv run python benchmarks/int8_error_by_layer.py RUN_DIR [--images 30]

Writes benchmarks/results/int8-error-by-layer.md and prints it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))


def activations(flatbuffer: bytes, pixels: np.ndarray) -> dict[str, tuple[int, np.ndarray]]:
    """Every float32 or quantized activation tensor of the model on one image: name → (index, real values)."""
    import warnings

    from ai_edge_litert.interpreter import Interpreter

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        interpreter = Interpreter(model_content=flatbuffer, experimental_preserve_all_tensors=True)
    index = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(index, [1, *pixels.shape])  # smaller images go in at their own size
    interpreter.allocate_tensors()
    interpreter.set_tensor(index, pixels[np.newaxis].astype(interpreter.get_input_details()[0]["dtype"]))
    interpreter.invoke()
    tensors = {}
    for detail in interpreter.get_tensor_details():
        try:
            values = interpreter.get_tensor(detail["index"])
        except ValueError:  # a tensor without data (freed, or an empty optional input)
            continue
        scale, zero_point = detail["quantization"]
        if detail["dtype"] in (np.int8, np.uint8) and scale:
            values = (values.astype(np.float32) - zero_point) * scale
        elif detail["dtype"] != np.float32:
            continue
        tensors[detail["name"]] = (detail["index"], values)
    return tensors


def int8_and_its_float_model(run, images) -> tuple[bytes, bytes, dict]:
    """The run's int8 file as `headstart export` makes it, the float model it was quantized from
    (channels equalized, weights on their int8 grid, ranges recorded; it runs in float32), and how
    its range end was chosen."""
    import headstart.edge.int8.quantization
    from headstart.edge.export import convert_classifier

    ranged, measured_ranges = [], headstart.edge.int8.quantization.measured_ranges

    def keeping_the_ranged_models(model, batches, range_ends):
        ranged.append(measured_ranges(model, batches, range_ends))
        return ranged[-1]

    headstart.edge.int8.quantization.measured_ranges = keeping_the_ranged_models
    try:
        int8, chosen = convert_classifier(run, "int8", images)
    finally:
        headstart.edge.int8.quantization.measured_ranges = measured_ranges
    return int8, ranged[0][chosen["range_end_percentile"]], chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--images", type=int, default=30)
    args = parser.parse_args()

    from headstart.edge import export_images, uint8_images
    from headstart.registry.runs import Run

    run = Run(args.run)
    images = export_images(run)
    int8, float32, _ = int8_and_its_float_model(run, images)
    signal: dict[str, float] = {}
    noise: dict[str, float] = {}
    order: dict[str, int] = {}
    for _, pixels in list(uint8_images(images.test, run.image_size))[: args.images]:
        reference, quantized = activations(float32, pixels), activations(int8, pixels)
        for name, (index, values) in quantized.items():
            if name in reference and reference[name][1].shape == values.shape and values.size > 100:
                truth = reference[name][1].astype(np.float64)
                signal[name] = signal.get(name, 0.0) + float((truth**2).sum())
                noise[name] = noise.get(name, 0.0) + float(((values - truth) ** 2).sum())
                order[name] = index
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT, capture_output=True, text=True
    ).stdout.strip()
    lines = [
        f"# int8 against float32, tensor by tensor (run {run.path.name}, {run.image_size} px, "
        f"{args.images} test images, commit {commit})",
        "",
        "| tensor | signal-to-noise ratio |",
        "|---|---|",
    ]
    for name in sorted(order, key=order.get):
        if signal[name] > 0 and noise[name] > 0:  # constants come out exact
            layer = (
                name.split(";")[-1].removeprefix("mobilenet_v2_torchvision/").removesuffix("/BiasAdd/ReadVariableOp1")
            )
            lines.append(f"| `{layer}` | {10 * np.log10(signal[name] / noise[name]):.1f} dB |")
    text = "\n".join(lines) + "\n"
    print(text)
    (PROJECT / "benchmarks" / "results" / "int8-error-by-layer.md").write_text(text)


if __name__ == "__main__":
    main()
