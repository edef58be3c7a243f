"""Models for phones and boards: .tflite export, float32 and int8.

The names below are the wing's entry, all that the rest of headstart (the tasks, the command line,
serving) uses. The modules behind them are its workings: export.py (a run as a .tflite file, checked
and recorded), tflite_file.py (the file's class names, running it with LiteRT) and int8/ (the
full-integer conversion); the tests and benchmarks that study one step of them import it by name.
"""

from headstart.edge.export import (
    QUANTIZATIONS,
    ExportImages,
    ExportRecord,
    Quantization,
    export_images,
    export_rows,
    export_tflite,
)
from headstart.edge.int8.quantization import quantized_backbone, representative_rows
from headstart.edge.tflite_file import TFLiteClassifier, embed_labels, read_labels, uint8_images

__all__ = [
    # A run as .tflite files, each checked against its Keras model and recorded in the run.
    "QUANTIZATIONS",
    "Quantization",
    "ExportImages",
    "ExportRecord",
    "export_images",
    "export_tflite",
    "export_rows",
    # A .tflite classifier: its class names, and running it with LiteRT alone.
    "TFLiteClassifier",
    "uint8_images",
    "read_labels",
    "embed_labels",
    # The litert-int8 extraction engine's backbone, calibrated on training images.
    "quantized_backbone",
    "representative_rows",
]
