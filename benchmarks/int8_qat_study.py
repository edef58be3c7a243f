"""Study: does quantization-aware training, distilled from the float model, make an int8 export keep
the float model's decisions? (Post-training quantization, as `headstart export --quantize int8` does it, keeps
about 91 % of them here; this study was run when it kept 82 %.)

    uv pip install tensorflow-model-optimization      # not a headstart dependency (yet)
    uv run --no-sync python benchmarks/int8_qat_study.py RUN_DIR [--epochs 3] [--learning-rate 1e-4]

For a run of the bundled (not fine-tuned) backbone: the network and its head are rebuilt in Keras,
wrapped by TensorFlow Model Optimization's `quantize_model` (fake int8 quantization of weights and
activations in training), and trained on the run's training images, enlarged to the run's image
size, to reproduce the float model's logits (mean squared error: the student learns to decide as
the teacher does, under quantization). It is then converted to a full-integer .tflite file with
uint8 input, like `headstart export --quantize int8`, and measured the same way against the run's
Keras model on its test split. Appends one JSON line to benchmarks/results/int8-qat-study.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # tfmot must wrap tf_keras models, as headstart builds them


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    try:
        import tensorflow_model_optimization as tfmot
    except ImportError:
        sys.exit("int8_qat_study: needs tensorflow-model-optimization (uv pip install tensorflow-model-optimization)")

    from headstart.backbone.checkpoint import read_legacy_checkpoint
    from headstart.backbone.handles import BUNDLED_HANDLE, CHECKPOINT_SHA256_PREFIX, bundled_checkpoint_path
    from headstart.backbone.mobilenet import build_mobilenet_v2
    from headstart.data.preprocessing import enlarge_images, imagenet_normalization
    from headstart.edge import ExportImages, TFLiteClassifier, embed_labels
    from headstart.edge.export import calibration_images, compare_with_keras, listed_again
    from headstart.edge.tflite_file import uint8_image
    from headstart.infra.keras import keras, tf
    from headstart.registry.runs import Run
    from headstart.training.head import HEAD_DENSE

    run = Run(args.run)
    if run.config["backbone"] != BUNDLED_HANDLE or run.config.get("fine_tune"):
        sys.exit(
            "int8_qat_study: give a run of the bundled backbone without --fine-tune (the study rebuilds that network)"
        )
    size = run.image_size
    listing = listed_again(run)
    images = ExportImages.from_manifest(listing, run)
    train_hashes = run.split_hashes("train")
    train_paths = [row["path"] for row in listing.to_pylist() if row["sha256"] in train_hashes]
    normalize = imagenet_normalization()

    def normalized(paths):
        return np.concatenate(
            [
                normalize(enlarge_images(uint8_image(Path(path), size)[None].astype(np.float32) / 255.0, size)).numpy()
                for path in paths
            ]
        )

    started = time.perf_counter()
    inputs = normalized(train_paths)
    network = build_mobilenet_v2(read_legacy_checkpoint(bundled_checkpoint_path(), CHECKPOINT_SHA256_PREFIX))
    kernel, bias = run.keras_model().get_layer(HEAD_DENSE).get_weights()
    image = keras.Input((size, size, 3))
    flat = keras.models.clone_model(
        network, input_tensors=image
    )  # the network's layers inline, as quantize_model needs
    flat.set_weights(network.get_weights())
    logits_layer = keras.layers.Dense(kernel.shape[1], name="logits")
    teacher = keras.Model(image, logits_layer(flat.output))
    logits_layer.set_weights([kernel, bias])
    targets = np.concatenate(
        [teacher.predict(inputs[start : start + 256], verbose=0) for start in range(0, len(inputs), 256)]
    )
    student = tfmot.quantization.keras.quantize_model(teacher)
    student.compile(keras.optimizers.Adam(args.learning_rate), loss="mse")
    history = student.fit(
        inputs, targets, batch_size=args.batch_size, epochs=args.epochs, shuffle=True, verbose=2
    ).history
    trained = time.perf_counter() - started

    @tf.function(input_signature=[tf.TensorSpec([1, size, size, 3], tf.float32, name="image")])
    def classify(pixels):
        return {"probability": tf.nn.softmax(student(normalize(enlarge_images(pixels / 255.0, size)), training=False))}

    converter = tf.lite.TFLiteConverter.from_concrete_functions([classify.get_concrete_function()], student)
    # The converter's plain full-integer conversion: the fake-quantized network carries its own ranges.
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.representative_dataset = lambda: ([batch] for batch in calibration_images(images.representative, size))
    converter.inference_input_type = tf.uint8
    with tempfile.TemporaryDirectory() as scratch:
        model_file = Path(scratch) / "qat-int8.tflite"
        model_file.write_bytes(embed_labels(converter.convert(), run.class_names, size, "quantization-aware study"))
        record = compare_with_keras(run, TFLiteClassifier(model_file), images, "int8")
    result = {
        "run": run.path.name,
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT, capture_output=True, text=True
        ).stdout.strip(),
        "training_images": len(train_paths),
        "epochs": args.epochs,
        "learning_rate": args.learning_rate,
        "batch_size": args.batch_size,
        "loss": history["loss"],
        "seconds_to_train": trained,
        **{
            key: record[key]
            for key in (
                "test_images",
                "top1_agreement",
                "accuracy",
                "keras_accuracy",
                "max_probability_difference",
                "meets_target",
            )
        },
    }
    print(json.dumps(result))
    with open(PROJECT / "benchmarks" / "results" / "int8-qat-study.jsonl", "a") as results:
        results.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
