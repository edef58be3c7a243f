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

import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

import numpy as np

from headstart.edge.int8.quantization import RANGE_ENDS, full_integer, representative_rows
from headstart.edge.tflite_file import TFLiteClassifier, embed_labels, uint8_images
from headstart.errors import HeadstartError, first_line
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


@dataclass(frozen=True, kw_only=True)
class ExportRecord:
    """One .tflite file of a run, measured against the run's Keras model on its test split: what
    the run's metrics.json keeps under `exports`, by quantization (`to_dict`, `from_dict`), and
    what the summary line, the dashboard's table and the model card show."""

    file: str  # a file inside the run by its path within it, any other as it was given
    quantize: Quantization
    bytes: int
    # int8 only: the percentile at which its ReLU6 ranges end, and, where it was chosen on the
    # validation split, the figures it was chosen by. Records of earlier versions lack some of them.
    range_end_percentile: float | None = None
    validation_divergence: float | None = None
    validation_agreement: float | None = None
    validation_images: int | None = None
    test_images: int
    max_probability_difference: float
    top1_agreement: float
    accuracy: float
    keras_accuracy: float
    meets_target: bool

    def to_dict(self) -> dict:
        """As metrics.json keeps it: the figures measured, and the summary line."""
        measured = {item.name: getattr(self, item.name) for item in fields(self)}
        return {**{name: value for name, value in measured.items() if value is not None}, "summary": self.summary}

    @classmethod
    def from_dict(cls, written: dict) -> "ExportRecord":
        """A record as metrics.json keeps it, written by this version or an earlier one; its summary
        line is made again from the figures."""
        return cls(**{item.name: written[item.name] for item in fields(cls) if item.name in written})

    @property
    def weights_and_activations(self) -> str:
        return "int8" if self.quantize == "int8" else "float32"

    @property
    def summary(self) -> str:
        """One line: what the file is, how close it comes to the Keras model, against which target."""
        if self.quantize == "int8":
            target = f"target ≥ {INT8_AGREEMENT:.0%} agreement and ≤ {INT8_ACCURACY_LOSS * 100:.0f} pt lost"
            closeness = (
                f"top-1 agreement {self.top1_agreement:.2%}, accuracy {self.accuracy:.4f} "
                f"(Keras {self.keras_accuracy:.4f})"
            )
            if self.range_end_percentile is not None:  # recorded since ranges end at a percentile
                chosen = (
                    f" (closest on {self.validation_images} validation images: "
                    f"divergence {self.validation_divergence:.4f}, agreement {self.validation_agreement:.2%})"
                    if self.validation_divergence is not None
                    else ""
                )
                closeness = f"ReLU6 ranges end at the {self.range_end_percentile:g}th percentile{chosen}; {closeness}"
        else:
            target = f"target max |Δp| ≤ {FLOAT_TOLERANCE:.0e}"
            closeness = (
                f"max |Δ probability| {self.max_probability_difference:.1e}, top-1 agreement {self.top1_agreement:.2%}"
            )
        return (
            f"{self.file} ({self.weights_and_activations}, {_file_size(self.bytes)}): {closeness} "
            f"on {self.test_images} test images; {target}: {'met' if self.meets_target else 'NOT met'}"
        )


def _default_destination(run: Run, quantize: Quantization) -> Path:
    return run.path / EXPORTS_DIR / f"model-{'int8' if quantize == 'int8' else 'float32'}.tflite"


def export_tflite(
    run: Run, quantize: Quantization, images: ExportImages, destination: Path | None = None
) -> ExportRecord:
    """Writes the run's classifier as a .tflite file (atomically), measures it against the run's
    Keras model on the test images, records the figures in the run; returns that record."""
    if run.backbone.litert_model is not None:
        raise HeadstartError(
            f"{run.path} was trained on int8 features (--engine litert-int8); export converts the float backbone, "
            "so export a run trained on float features"
        )
    run.head_weights()  # a model file headstart would not load stops the export before any work
    destination = Path(destination) if destination is not None else _default_destination(run, quantize)
    converted, chosen = convert_classifier(run, quantize, images)
    flatbuffer = embed_labels(
        converted,
        run.class_names,
        run.image_size,
        f"Classifies {', '.join(run.class_names)}; trained by headstart (run {run.path.name}).",
    )
    with atomic_path(destination) as temporary:
        temporary.write_bytes(flatbuffer)
        record = ExportRecord(
            file=_as_recorded(destination, run),
            quantize=quantize,
            bytes=len(flatbuffer),
            **chosen,
            **compare_with_keras(run, TFLiteClassifier(temporary, threads=None), images, quantize),
        )
    _record_export(run, record)
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

    size = run.image_size
    try:
        module = tf.saved_model.load(str(run.path / BACKBONE_DIR))
    except Exception as error:  # SavedModel loading fails in many types; all mean a damaged module.
        raise HeadstartError(f"could not load {run.path / BACKBONE_DIR}: {first_line(error)}") from None
    features = litert_function(module, size)
    kernel, bias = (tf.constant(weight) for weight in run.head_weights())
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
    serving = run.classifier()
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
    """The .tflite model against the run's Keras model (as headstart rebuilds it) on the test images:
    the same uint8 pixels into both."""
    serving = run.classifier()
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
    comparison = {
        "test_images": len(used),
        "max_probability_difference": float(np.abs(ours - theirs).max()),
        "top1_agreement": float((ours.argmax(1) == theirs.argmax(1)).mean()),
        "accuracy": accuracy,
        "keras_accuracy": keras_accuracy,
    }
    if quantize == "int8":
        comparison["meets_target"] = (
            comparison["top1_agreement"] >= INT8_AGREEMENT and keras_accuracy - accuracy <= INT8_ACCURACY_LOSS
        )
    else:
        comparison["meets_target"] = comparison["max_probability_difference"] <= FLOAT_TOLERANCE
    return comparison


def _file_size(size: int) -> str:
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.0f} KiB"


def export_rows(records: list[ExportRecord]) -> list[dict]:
    """The exports as table rows, for the dashboard."""
    return [
        {
            "file": record.file,
            "weights and activations": record.weights_and_activations,
            "size": _file_size(record.bytes),
            "max |Δ probability|": f"{record.max_probability_difference:.1e}",
            "top-1 agreement": f"{record.top1_agreement:.2%}",
            "accuracy": round(record.accuracy, 4),
            "Keras accuracy": round(record.keras_accuracy, 4),
            "target met": record.meets_target,
        }
        for record in records
    ]


def _record_export(run: Run, record: ExportRecord) -> None:
    """The export's figures into the run's metrics.json (`exports`, by quantization, each other
    export's as it was written) and its model card."""
    metrics = run.update_metrics(
        lambda written: {**written, "exports": {**written.get("exports", {}), record.quantize: record.to_dict()}}
    )
    records = [ExportRecord.from_dict(written) for written in metrics["exports"].values()]
    write_bytes_atomic(run.path / MODEL_CARD_FILE, card_with_exports(run.model_card, records).encode())


def card_with_exports(card: str, records: list[ExportRecord]) -> str:
    """The model card with the section on `records` in place of the one it had, if any: that section
    is the card's last, and only an export writes it; the card above it stays as training wrote it."""
    trained = card.partition(f"\n{CARD_SECTION}\n")[0].rstrip("\n")
    return f"{trained}\n\n{card_section(records)}"


def card_section(records: list[ExportRecord]) -> str:
    """The model card's section on the exports: a table, float32 first, and how the int8 file's
    ranges were chosen."""
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
    for record in sorted(records, key=lambda record: record.quantize != "none"):  # float32 first
        lines.append(
            f"| `{Path(record.file).name}` | {record.weights_and_activations} "
            f"| {_file_size(record.bytes)} | "
            f"{record.max_probability_difference:.1e} | {record.top1_agreement:.2%} | {record.accuracy:.4f} "
            f"({record.keras_accuracy:.4f}) | {'yes' if record.meets_target else 'no'} |"
        )
    int8 = next((record for record in records if record.quantize == "int8"), None)
    if int8 is not None and int8.validation_divergence is not None:
        lines += [
            "",
            f"The int8 file's ReLU6 ranges end at the {int8.range_end_percentile:g}th percentile "
            "of their calibration values, "
            f"the one of {', '.join(f'{end:g}' for end in RANGE_ENDS)} whose file's probabilities "
            "came closest to the Keras model's on "
            f"{int8.validation_images} validation images "
            f"(mean Kullback–Leibler divergence {int8.validation_divergence:.4f}; "
            f"top-1 agreement {int8.validation_agreement:.2%}).",
        ]
    return "\n".join(lines) + "\n"
