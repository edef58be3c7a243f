"""A trained run as one .tflite file for phones and boards: float32, or full-integer int8.

The file is the whole classifier: uint8 RGB pixels [1, size, size, 3] in, one float32 probability
per class out, the class names packed inside (headstart.edge.tflite_file). It enlarges smaller images
itself with the same bilinear resize training used, so an image goes in at its own size where it
is no larger. Every export is checked against the run's own Keras model on the run's test split,
and the figures go into the run's metrics.json and model card:

- float32: the largest difference of any probability (target ≤ FLOAT_TOLERANCE);
- int8 (weights and activations; calibrated on training images): top-1 agreement with the Keras
  model (target ≥ INT8_AGREEMENT) and the change in accuracy (target: at most INT8_ACCURACY_LOSS lost).
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from headstart.edge.int8.quantization import RANGE_ENDS, full_integer, representative_rows
from headstart.edge.tflite_file import TFLiteClassifier, embed_labels, uint8_images
from headstart.errors import HeadstartError
from headstart.infra.storage import atomic_path, write_bytes_atomic
from headstart.registry.runs import BACKBONE_DIR, MODEL_CARD_FILE, Run

Quantization = Literal["none", "int8"]
QUANTIZATIONS: tuple[Quantization, ...] = ("none", "int8")
FLOAT_TOLERANCE = 1e-4
INT8_AGREEMENT = 0.98
INT8_ACCURACY_LOSS = 0.01
EXPORTS_DIR = "exports"
CARD_SECTION = "## On devices (.tflite)"


@dataclass(frozen=True)
class ExportImages:
    """The run's images an export reads: training images that calibrate int8, the validation split
    on which an int8 file's ranges are chosen, and the test split every file is checked on."""

    representative: list[str]
    test: list[str]
    test_labels: np.ndarray
    validation: list[str] = field(default_factory=list)

    @classmethod
    def from_manifest(cls, table, run: Run) -> "ExportImages":
        """From a manifest table (path, label, sha256, split): the training images spread evenly
        over the split in hash order, and the validation and test images the run itself had where
        it kept its data index."""
        rows = table.to_pylist()
        representative = representative_rows(rows)
        test, validation = (_in_split(rows, split, run.split_hashes(split)) for split in ("test", "validation"))
        if not representative or not test:
            raise HeadstartError(
                f"the data of {run.path} has no {'training' if not representative else 'test'} "
                "images left to export with"
            )
        return cls(
            [row["path"] for row in representative],
            [row["path"] for row in test],
            np.array([row["label"] for row in test], np.int64),
            [row["path"] for row in validation],
        )


def _in_split(rows: list[dict], split: str, hashes: set[str] | None) -> list[dict]:
    return [row for row in rows if row["split"] == split and (hashes is None or row["sha256"] in hashes)]


def export_images(run: Run, cache_dir: Path | None = None) -> ExportImages:
    """The images an export of the run reads (see `listed_again`)."""
    return ExportImages.from_manifest(listed_again(run, cache_dir), run)


def listed_again(run: Run, cache_dir: Path | None = None):
    """The run's data source listed and split again from its training configuration, the way
    training split it, as a manifest table (`cache_dir` overrides where the cache is)."""
    from headstart.config import TrainConfig
    from headstart.data.sources import prepare_source

    values = {name: value for name, value in run.config.items() if name in TrainConfig.options()}
    if values.get("data") != "cifar10" and not Path(str(values.get("data"))).is_dir():
        raise HeadstartError(
            f"the training data of {run.path} is gone ({values.get('data')}): "
            "an export checks itself on the run's test split"
        )
    config = TrainConfig(**values)
    manifest, _ = prepare_source(config.data, cache_dir if cache_dir is not None else config.runtime.cache_dir)
    return manifest.read()


def default_destination(run: Run, quantize: Quantization) -> Path:
    return run.path / EXPORTS_DIR / f"model-{'int8' if quantize == 'int8' else 'float32'}.tflite"


def export_tflite(run: Run, quantize: Quantization, images: ExportImages, destination: Path | None = None) -> dict:
    """Writes the run's classifier as a .tflite file (atomically), measures it against the run's
    Keras model on the test images, records the figures in the run; returns that record."""
    if run.backbone.litert_model is not None:
        raise HeadstartError(
            f"{run.path} was trained on int8 features (--engine litert-int8); export converts the float backbone, "
            "so export a run trained on float features"
        )
    destination = Path(destination) if destination is not None else default_destination(run, quantize)
    converted, chosen = convert_classifier(run, quantize, images)
    flatbuffer = embed_labels(
        converted,
        run.class_names,
        run.image_size,
        f"Classifies {', '.join(run.class_names)}; trained by headstart (run {run.path.name}).",
    )
    with atomic_path(destination) as temporary:
        temporary.write_bytes(flatbuffer)
        record = {
            "file": _as_recorded(destination, run),
            "quantize": quantize,
            "bytes": len(flatbuffer),
            **chosen,
            **compare_with_keras(run, TFLiteClassifier(temporary, threads=None), images, quantize),
        }
        record["summary"] = summary(record)
    record_export(run, record)
    return record


def _as_recorded(file: Path, run: Run) -> str:
    """A file inside the run by its path within it (a copied run then names its own copy)."""
    return (
        str(file.resolve().relative_to(run.path.resolve()))
        if file.resolve().is_relative_to(run.path.resolve())
        else str(file)
    )


def convert_classifier(
    run: Run, quantize: Quantization, images: ExportImages, range_ends: tuple[float, ...] = RANGE_ENDS
) -> tuple[bytes, dict]:
    """The run's classifier converted by the TFLite converter (its backbone module, then its head),
    and for int8 how its ReLU6 ranges were chosen: one file per range end (calibrated on
    `images.representative`), kept is the one closest to the Keras model on the validation images
    (`closest_variant`); a run without validation images takes the first range end."""
    from headstart.backbone.hub_module import litert_function
    from headstart.infra.keras import tf
    from headstart.training.head import HEAD_DENSE

    size = run.image_size
    module = tf.saved_model.load(str(run.path / BACKBONE_DIR))
    features = litert_function(module, size)
    kernel, bias = (tf.constant(weight) for weight in run.keras_model().get_layer(HEAD_DENSE).get_weights())
    # int8 converts from float pixels, and the converter puts the uint8 input in front.
    input_type = tf.float32 if quantize == "int8" else tf.uint8

    @tf.function(input_signature=[tf.TensorSpec([1, size, size, 3], input_type, name="image")])
    def classify(image):
        vectors = features(tf.cast(image, tf.float32) / 255.0)
        if isinstance(vectors, dict):  # a signature's one output
            (vectors,) = vectors.values()
        return {"probability": tf.nn.softmax(tf.matmul(vectors, kernel) + bias)}

    converter = tf.lite.TFLiteConverter.from_concrete_functions([classify.get_concrete_function()], module)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    from headstart.infra.native_logs import native_notices_dropped

    with native_notices_dropped(), native_notices_dropped(1):
        if quantize != "int8":
            return converter.convert(), {}
        variants = full_integer(
            converter,
            lambda: calibration_images(images.representative, size),
            tf.uint8,
            range_ends if images.validation else range_ends[:1],
        )
    return closest_variant(run, variants, images.validation)


def closest_variant(run: Run, variants: dict[float, bytes], validation: list[str]) -> tuple[bytes, dict]:
    """Of int8 files by range end, the one whose probabilities on the validation images come
    closest to the Keras model's (the least mean Kullback–Leibler divergence; the first of equals),
    and the figures it was chosen by, its top-1 agreement among them. The divergence weighs every
    image by how far its probabilities moved, where agreement counts only the few that cross a
    decision, and so tells close files apart with less chance; neither needs labels, and the test
    split stays unseen until the kept file is checked."""
    pixels = [image for _, image in uint8_images(validation, run.image_size)] if len(variants) > 1 else []
    if not pixels:
        first = next(iter(variants))
        return variants[first], {"range_end_percentile": first}
    serving = run.serving_model()
    expected = np.concatenate([serving(image[np.newaxis].astype(np.float32)) for image in pixels])
    divergence, agreement = {}, {}
    with tempfile.TemporaryDirectory(prefix="headstart-int8-") as scratch:
        for end, flatbuffer in variants.items():
            candidate = Path(scratch) / f"{end}.tflite"
            candidate.write_bytes(embed_labels(flatbuffer, run.class_names, run.image_size, "candidate"))
            model = TFLiteClassifier(candidate)
            probabilities = np.concatenate([model([image]) for image in pixels])
            divergence[end] = mean_divergence(expected, probabilities)
            agreement[end] = float((probabilities.argmax(1) == expected.argmax(1)).mean())
    end = min(divergence, key=divergence.get)  # min keeps the first of equals
    return variants[end], {
        "range_end_percentile": end,
        "validation_divergence": divergence[end],
        "validation_agreement": agreement[end],
        "validation_images": len(pixels),
    }


def mean_divergence(expected: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean Kullback–Leibler divergence (nats) of `probabilities` from `expected`, image by image."""
    floor = 1e-7  # an int8 probability may round to exactly 0
    return float(np.mean(np.sum(expected * (np.log(expected + floor) - np.log(probabilities + floor)), axis=1)))


def calibration_images(paths: list[str], image_size: int):
    """Float32 [1, size, size, 3] pixels 0–255 of the images, at the model's size (as the model's
    own resize makes them). The first has one black and one white pixel, so the uint8 input is
    calibrated to exactly 0–255 and raw pixels go in as they are."""
    from headstart.data.preprocessing import resize_batch

    for position, (_, image) in enumerate(uint8_images(paths, image_size)):
        pixels = resize_batch([image.astype(np.float32)], image_size)
        if position == 0:
            pixels[0, 0, 0], pixels[0, 0, 1] = 0.0, 255.0
        yield pixels


def compare_with_keras(run: Run, model: TFLiteClassifier, images: ExportImages, quantize: Quantization) -> dict:
    """The .tflite model against the run's Keras model (its serving signature) on the test images:
    the same uint8 pixels into both."""
    serving = run.serving_model()
    ours, theirs, used = [], [], []
    for position, pixels in uint8_images(images.test, run.image_size):
        ours.append(model([pixels]))
        theirs.append(serving(pixels[np.newaxis].astype(np.float32)))
        used.append(position)
    if not used:
        raise HeadstartError(
            f"none of the {len(images.test)} test images of {run.path} can be read any more: "
            "the export cannot be checked"
        )
    ours, theirs, labels = np.concatenate(ours), np.concatenate(theirs), images.test_labels[used]
    accuracy = float((ours.argmax(1) == labels).mean())
    keras_accuracy = float((theirs.argmax(1) == labels).mean())
    record = {
        "test_images": len(used),
        "max_probability_difference": float(np.abs(ours - theirs).max()),
        "top1_agreement": float((ours.argmax(1) == theirs.argmax(1)).mean()),
        "accuracy": accuracy,
        "keras_accuracy": keras_accuracy,
    }
    if quantize == "int8":
        record["meets_target"] = (
            record["top1_agreement"] >= INT8_AGREEMENT and keras_accuracy - accuracy <= INT8_ACCURACY_LOSS
        )
    else:
        record["meets_target"] = record["max_probability_difference"] <= FLOAT_TOLERANCE
    return record


def summary(record: dict) -> str:
    """One line on an export: what it is, how close it comes to the Keras model, against which target."""
    if record["quantize"] == "int8":
        target = f"target ≥ {INT8_AGREEMENT:.0%} agreement and ≤ {INT8_ACCURACY_LOSS * 100:.0f} pt lost"
        closeness = (
            f"ReLU6 ranges end at the {record['range_end_percentile']:g}th percentile"
            + (
                f" (closest on {record['validation_images']} validation images: "
                f"divergence {record['validation_divergence']:.4f}, "
                f"agreement {record['validation_agreement']:.2%})"
                if "validation_divergence" in record
                else ""
            )
            + (
                f"; top-1 agreement {record['top1_agreement']:.2%}, accuracy {record['accuracy']:.4f} "
                f"(Keras {record['keras_accuracy']:.4f})"
            )
        )
    else:
        target = f"target max |Δp| ≤ {FLOAT_TOLERANCE:.0e}"
        closeness = (
            f"max |Δ probability| {record['max_probability_difference']:.1e}, "
            f"top-1 agreement {record['top1_agreement']:.2%}"
        )
    return (
        f"{record['file']} ({'int8' if record['quantize'] == 'int8' else 'float32'}, "
        f"{file_size(record['bytes'])}): {closeness} "
        f"on {record['test_images']} test images; {target}: {'met' if record['meets_target'] else 'NOT met'}"
    )


def file_size(size: int) -> str:
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.0f} KiB"


def export_rows(records: list[dict]) -> list[dict]:
    """The exports as table rows, for the dashboard."""
    return [
        {
            "file": record["file"],
            "weights and activations": "int8" if record["quantize"] == "int8" else "float32",
            "size": file_size(record["bytes"]),
            "max |Δ probability|": f"{record['max_probability_difference']:.1e}",
            "top-1 agreement": f"{record['top1_agreement']:.2%}",
            "accuracy": round(record["accuracy"], 4),
            "Keras accuracy": round(record["keras_accuracy"], 4),
            "target met": record["meets_target"],
        }
        for record in records
    ]


def record_export(run: Run, record: dict) -> None:
    """The export's figures into the run's metrics.json (`exports`, by quantization) and model card."""
    metrics = run.update_metrics(
        lambda written: {**written, "exports": {**written.get("exports", {}), record["quantize"]: record}}
    )
    card = re.split(rf"\n{re.escape(CARD_SECTION)}\n", run.model_card)[0].rstrip("\n")
    write_bytes_atomic(run.path / MODEL_CARD_FILE, f"{card}\n\n{card_section(metrics['exports'])}".encode())


def card_section(exports: dict) -> str:
    lines = [
        CARD_SECTION,
        "Each file takes uint8 RGB pixels (its size square, or smaller: it enlarges them itself) and gives one "
        "probability per class; the class names are packed inside (`labels.txt`, TFLite metadata). Measured against "
        "the Keras model on the test split:",
        "",
        "| file | weights and activations | size | max \\|Δ probability\\| | top-1 agreement | accuracy (Keras) "
        "| target met |",
        "|---|---|---|---|---|---|---|",
    ]
    for quantize, record in sorted(exports.items(), key=lambda item: item[0] != "none"):  # float32 first
        lines.append(
            f"| `{Path(record['file']).name}` | {'int8' if quantize == 'int8' else 'float32'} "
            f"| {file_size(record['bytes'])} | "
            f"{record['max_probability_difference']:.1e} | {record['top1_agreement']:.2%} | {record['accuracy']:.4f} "
            f"({record['keras_accuracy']:.4f}) | {'yes' if record['meets_target'] else 'no'} |"
        )
    int8 = exports.get("int8", {})
    if "validation_divergence" in int8:
        lines += [
            "",
            f"The int8 file's ReLU6 ranges end at the {int8['range_end_percentile']:g}th percentile "
            "of their calibration values, "
            f"the one of {', '.join(f'{end:g}' for end in RANGE_ENDS)} whose file's probabilities "
            "came closest to the Keras model's on "
            f"{int8['validation_images']} validation images "
            f"(mean Kullback–Leibler divergence {int8['validation_divergence']:.4f}; "
            f"top-1 agreement {int8['validation_agreement']:.2%}).",
        ]
    return "\n".join(lines) + "\n"
