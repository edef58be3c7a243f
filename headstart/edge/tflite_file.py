""".tflite classifiers: the class names they carry, and running one with LiteRT alone.

The class names travel inside the file the way TFLite Model Maker packs them: a `TFLITE_METADATA`
record (the TFLite metadata schema, file identifier "M001") describes the input image and names
`labels.txt` as the labels of the output's class axis, and `labels.txt` itself is appended to
the flatbuffer as a zip archive, which interpreters ignore and metadata readers open. Reading
and running a file here needs LiteRT, flatbuffers and Pillow, never TensorFlow.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import flatbuffers
import numpy as np

from headstart.errors import HeadstartError, first_line

METADATA_NAME = "TFLITE_METADATA"
LABELS_FILE = "labels.txt"
METADATA_IDENTIFIER = b"M001"
METADATA_PARSER_VERSION = "1.0.0"


# The metadata schema's (metadata_schema.fbs) enum values and union tags used below, under the
# schema's own names. Its generated module ships with tflite-support, not with LiteRT, and is not
# installed for four numbers; tests/test_export.py checks these against the official module.
class _AssociatedFileType:
    TENSOR_AXIS_LABELS = 2


class _ColorSpaceType:
    RGB = 1


class _ContentProperties:
    ImageProperties = 2


class _ProcessUnitOptions:
    NormalizationOptions = 1


def embed_labels(flatbuffer: bytes, class_names: list[str], image_size: int, description: str) -> bytes:
    """The model with its class names packed in: a metadata record and the appended labels.txt."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(flatbuffer))
    model.metadata = [entry for entry in (model.metadata or []) if entry.name.decode() != METADATA_NAME]
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(_model_metadata(class_names, image_size, description), np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name, entry.buffer = METADATA_NAME, len(model.buffers) - 1
    model.metadata.append(entry)
    packed = bytes(flatbuffer_utils.convert_object_to_bytearray(model))
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as labels:
        labels.writestr(LABELS_FILE, "".join(f"{name}\n" for name in class_names))
    return packed + archive.getvalue()


def _model_metadata(class_names: list[str], image_size: int, description: str) -> bytes:
    """A ModelMetadata flatbuffer: input image (RGB, 0–255, image_size square), output probabilities
    labelled by labels.txt. Tables are built field by field in the schema's slot order."""
    builder = flatbuffers.Builder(1024)

    def table(fields: list[tuple[int, str, object]]) -> int:
        builder.StartObject(max(slot for slot, _, _ in fields) + 1)
        for slot, kind, value in fields:
            {
                "offset": builder.PrependUOffsetTRelativeSlot,
                "byte": builder.PrependInt8Slot,
                "ubyte": builder.PrependUint8Slot,
                "uint": builder.PrependUint32Slot,
            }[kind](slot, value, 0)
        return builder.EndObject()

    def offsets(items: list[int]) -> int:
        builder.StartVector(4, len(items), 4)
        for item in reversed(items):
            builder.PrependUOffsetTRelative(item)
        return builder.EndVector()

    def floats(values: list[float]) -> int:
        builder.StartVector(4, len(values), 4)
        for value in reversed(values):
            builder.PrependFloat32(value)
        return builder.EndVector()

    string = builder.CreateString
    labels = table(
        [
            (0, "offset", string(LABELS_FILE)),
            (1, "offset", string("Class names, one per line, in the order of the output")),
            (2, "byte", _AssociatedFileType.TENSOR_AXIS_LABELS),
        ]
    )
    size = table([(0, "uint", image_size), (1, "uint", image_size)])
    image_properties = table([(0, "byte", _ColorSpaceType.RGB), (1, "offset", size)])
    image_content = table([(0, "ubyte", _ContentProperties.ImageProperties), (1, "offset", image_properties)])
    # The model takes 0–255 pixels as they are: the identity normalisation, as Model Maker states it.
    normalization = table([(0, "offset", floats([0.0])), (1, "offset", floats([1.0]))])
    process_unit = table([(0, "ubyte", _ProcessUnitOptions.NormalizationOptions), (1, "offset", normalization)])
    stats = table([(0, "offset", floats([255.0])), (1, "offset", floats([0.0]))])
    image = table(
        [
            (0, "offset", string("image")),
            (1, "offset", string(f"RGB image, {image_size}×{image_size} pixels, values 0–255 (uint8)")),
            (3, "offset", image_content),
            (4, "offset", offsets([process_unit])),
            (5, "offset", stats),
        ]
    )
    probability_stats = table([(0, "offset", floats([1.0])), (1, "offset", floats([0.0]))])
    probability = table(
        [
            (0, "offset", string("probability")),
            (1, "offset", string("Probability of each class")),
            (5, "offset", probability_stats),
            (6, "offset", offsets([labels])),
        ]
    )
    subgraph = table(
        [
            (0, "offset", string("image_classifier")),
            (2, "offset", offsets([image])),
            (3, "offset", offsets([probability])),
        ]
    )
    root = table(
        [
            (0, "offset", string("image classifier")),
            (1, "offset", string(description)),
            (3, "offset", offsets([subgraph])),
            (4, "offset", string("headstart")),
            (7, "offset", string(METADATA_PARSER_VERSION)),
        ]
    )
    builder.Finish(root, file_identifier=METADATA_IDENTIFIER)
    return bytes(builder.Output())


def read_labels(model: bytes, source: str = "the model") -> list[str]:
    """The class names packed into a .tflite file by `embed_labels`."""
    if not _has_metadata(model):
        raise HeadstartError(
            f"{source} is not a .tflite model with class names (no {METADATA_NAME} record): "
            "export one with `headstart export`"
        )
    try:
        with zipfile.ZipFile(io.BytesIO(model)) as packed:
            text = packed.read(LABELS_FILE).decode()
    except (zipfile.BadZipFile, KeyError):
        raise HeadstartError(f"{source} has no packed {LABELS_FILE}, so no class names") from None
    return text.splitlines()


def _has_metadata(model: bytes) -> bool:
    from ai_edge_litert import schema_py_generated as schema

    try:
        root = schema.Model.GetRootAs(model, 0)
        return any(root.Metadata(index).Name() == METADATA_NAME.encode() for index in range(root.MetadataLength()))
    except Exception:  # not a flatbuffer at all: flatbuffers raises whatever its offsets run into
        return False


class TFLiteClassifier:
    """A headstart .tflite classifier, run with LiteRT: uint8 RGB images → class probabilities.

    The file takes [1, size, size, 3] as declared; it enlarges smaller images itself, so images no
    larger than its size go in at their own size, as in training (`uint8_image` prepares a file).
    """

    def __init__(self, path: Path, threads: int | None = None):
        import os

        from ai_edge_litert.interpreter import Interpreter

        self.path = Path(path)
        if not self.path.is_file():
            raise HeadstartError(f"model file not found: {self.path}")
        model = self.path.read_bytes()
        self.class_names = read_labels(model, str(self.path))
        try:
            self.interpreter = Interpreter(model_content=model, num_threads=threads or os.cpu_count() or 1)
        except ValueError as error:
            raise HeadstartError(f"{self.path} is not a usable .tflite model: {first_line(error)}") from None
        self._input = self.interpreter.get_input_details()[0]
        self._output = self.interpreter.get_output_details()[0]
        self.image_size = int(self._input["shape"][1])
        # A full-integer model states how its uint8 input maps to real values; a float model casts it.
        self.quantized = bool(self._input["quantization"][0])
        if self._input["dtype"] != np.uint8:
            raise HeadstartError(
                f"{self.path} takes {np.dtype(self._input['dtype']).name} input; "
                "a headstart .tflite classifier takes uint8 pixels"
            )
        self._shape: tuple | None = None

    def __call__(self, images: list[np.ndarray]) -> np.ndarray:
        """Probabilities [n, classes] of uint8 RGB images [h, w, 3], each no larger than the model's size."""
        from headstart.infra.native_logs import native_notices_dropped

        outputs = []
        for image in images:
            if image.shape != self._shape:
                self.interpreter.resize_tensor_input(self._input["index"], [1, *image.shape], strict=False)
                # The first allocation creates the XNNPACK delegate, which announces itself.
                with native_notices_dropped():
                    self.interpreter.allocate_tensors()
                self._shape = image.shape
            self.interpreter.set_tensor(self._input["index"], self._quantized_input(image))
            self.interpreter.invoke()
            outputs.append(_dequantized(self.interpreter.get_tensor(self._output["index"]), self._output))
        return np.concatenate(outputs) if outputs else np.zeros((0, len(self.class_names)), np.float32)

    def _quantized_input(self, image: np.ndarray) -> np.ndarray:
        """The pixels as the input tensor holds them: as they are where it maps 0–255 to itself
        (headstart's own exports), else quantized by its scale and zero point."""
        scale, zero_point = self._input["quantization"]
        if not self.quantized or (scale == 1.0 and zero_point == 0):
            return np.ascontiguousarray(image[np.newaxis], np.uint8)
        return np.clip(np.round(image[np.newaxis] / scale) + zero_point, 0, 255).astype(np.uint8)


def _dequantized(values: np.ndarray, details: dict) -> np.ndarray:
    scale, zero_point = details["quantization"]
    if values.dtype == np.float32 or not scale:
        return values.astype(np.float32)
    return ((values.astype(np.float32) - zero_point) * scale).astype(np.float32)


def uint8_image(path: Path, image_size: int) -> np.ndarray:
    """An image file as the .tflite model takes it: uint8 RGB, shrunk (antialiased, by Pillow) to
    image_size × image_size where any side is larger, else at its own size."""
    from PIL import Image

    from headstart.data.images import load_image

    pixels = load_image(path)
    if max(pixels.shape[:2]) <= image_size:
        return pixels
    return np.asarray(Image.fromarray(pixels).resize((image_size, image_size), Image.BILINEAR))


def uint8_images(paths: list, image_size: int, unusable: list | None = None):
    """(position, `uint8_image`) of each file that still decodes; each other one's (position,
    reason) goes to `unusable` where given: a file changed or broken since it was listed is left
    out, never fatal."""
    for position, path in enumerate(paths):
        try:
            yield position, uint8_image(Path(path), image_size)
        except Exception as error:  # PIL and the file system raise many types; each means 'unusable now'.
            if unusable is not None:
                unusable.append(
                    (position, f"could not be read when decoded: {type(error).__name__}: {first_line(error)}")
                )
