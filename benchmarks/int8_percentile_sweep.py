"""Study: where should a ReLU6 output's int8 range end? The run's classifier exported to int8 with
the range ending at each of several percentiles of the calibration values (100: at their maximum,
the converter's own choice), each measured against the run's Keras model on its test split, and
its closeness on the validation split too (mean divergence and top-1 agreement: `headstart export`
keeps the file of least divergence among headstart.edge.int8.quantization.RANGE_ENDS).

    uv run python benchmarks/int8_percentile_sweep.py RUN_DIR [--percentiles 99.5,99.7,99.9,99.97,99.99,100]

The run itself is left as it is (nothing is recorded in it). Appends one JSON line per percentile
to benchmarks/results/int8-percentile-sweep.jsonl and prints them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--percentiles", default="99.5,99.7,99.9,99.97,99.99,100")
    args = parser.parse_args()

    import numpy as np

    from headstart.edge import TFLiteClassifier, embed_labels, export_images, uint8_images
    from headstart.edge.export import compare_with_keras, convert_classifier, mean_divergence
    from headstart.registry.runs import Run

    run = Run(args.run)
    images = export_images(run)
    validation = [pixels for _, pixels in uint8_images(images.validation, run.image_size)]
    serving = run.serving_model()
    expected = np.concatenate([serving(pixels[np.newaxis].astype(np.float32)) for pixels in validation])
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT, capture_output=True, text=True
    ).stdout.strip()
    with (
        tempfile.TemporaryDirectory() as scratch,
        open(PROJECT / "benchmarks" / "results" / "int8-percentile-sweep.jsonl", "a") as results,
    ):
        for percentile in (float(value) for value in args.percentiles.split(",")):
            started = time.perf_counter()
            model_file = Path(scratch) / f"int8-{percentile}.tflite"
            model_file.write_bytes(
                embed_labels(
                    convert_classifier(run, "int8", images, (percentile,))[0], run.class_names, run.image_size, "sweep"
                )
            )
            seconds = time.perf_counter() - started
            model = TFLiteClassifier(model_file)
            record = compare_with_keras(run, model, images, "int8")
            probabilities = np.concatenate([model([pixels]) for pixels in validation])
            line = {
                "run": run.path.name,
                "commit": commit,
                "image_size": run.image_size,
                "percentile": percentile,
                "seconds_to_convert": seconds,
                **{
                    key: record[key]
                    for key in ("test_images", "top1_agreement", "accuracy", "keras_accuracy", "meets_target")
                },
                "validation_images": len(validation),
                "validation_divergence": mean_divergence(expected, probabilities),
                "validation_agreement": float((probabilities.argmax(1) == expected.argmax(1)).mean()),
            }
            print(json.dumps(line), flush=True)
            results.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
