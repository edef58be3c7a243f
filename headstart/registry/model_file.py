"""Reading a run's model.keras without running anything it holds.

A model file is a program for Keras: loading it rebuilds every layer its config names, and a
`Lambda` layer carries Python code that runs as it loads (in an HDF5 file Keras' safe_mode does not
even look). headstart wrote the file and knows its architecture (headstart.training.head), so it
reads only the head's weights from it: the file must be the zip archive headstart writes, its
config may name only the layers headstart builds, and the weights are read as plain arrays.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np

from headstart.errors import HeadstartError, first_line

CONFIG_ENTRY = "config.json"
WEIGHTS_ENTRY = "model.weights.h5"
# The layers of the classifier headstart builds, by their Keras class names.
CLASSIFIER_LAYERS = frozenset({"InputLayer", "ImagePreprocessing", "KerasLayer", "Dropout", "Dense"})
# Where the Keras zip format keeps the one Dense layer's kernel and bias.
DENSE_KERNEL, DENSE_BIAS = "layers/dense/vars/0", "layers/dense/vars/1"
REDO = "train the run again or promote another version"
# Far above any head's and backbone's weights; a larger entry is a compression bomb, not a model.
MAX_ENTRY_BYTES = 2**30


def read_head_weights(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The head's Dense kernel [features, classes] and bias [classes] from a .keras file headstart
    wrote; any other file is refused in one line that names it."""
    path = Path(path)
    if not path.is_file():
        raise HeadstartError(f"{path} is missing or not a file: {REDO}")
    if not zipfile.is_zipfile(path):
        raise HeadstartError(
            f"refusing to load {path}: it is not the zip .keras file headstart writes "
            f"(an HDF5 or other model file can run code as it loads); {REDO}"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            for entry in map(archive.getinfo, (CONFIG_ENTRY, WEIGHTS_ENTRY)):
                if entry.file_size > MAX_ENTRY_BYTES:
                    raise HeadstartError(
                        f"refusing to load {path}: its {entry.filename} unpacks to {entry.file_size} bytes; {REDO}"
                    )
            layers = _layer_classes(json.loads(archive.read(CONFIG_ENTRY)))
            foreign = sorted(set(layers) - CLASSIFIER_LAYERS)
            if foreign:
                raise HeadstartError(
                    f"refusing to load {path}: it holds a {foreign[0]} layer, which headstart never writes "
                    f"and whose code it does not run; {REDO}"
                )
            if layers.count("Dense") != 1:
                raise ValueError(f"{layers.count('Dense')} Dense layers where the head has one")
            weights = archive.read(WEIGHTS_ENTRY)
        import h5py

        with h5py.File(io.BytesIO(weights), "r") as stored:
            kernel, bias = (np.asarray(stored[name], np.float32) for name in (DENSE_KERNEL, DENSE_BIAS))
    except HeadstartError:
        raise
    except Exception as error:  # zip, JSON and HDF5 readers fail in many types; all mean a damaged file.
        raise HeadstartError(f"{path} is damaged ({first_line(error)}): {REDO}") from None
    if kernel.ndim != 2 or bias.shape != (kernel.shape[1],):
        raise HeadstartError(
            f"{path} is damaged (its head's weights have shapes {kernel.shape} and {bias.shape}): {REDO}"
        )
    return kernel, bias


def _layer_classes(config) -> list[str]:
    """The class names of a Functional model config's layers; anything else is a damaged file."""
    if not isinstance(config, dict) or config.get("class_name") != "Functional":
        raise ValueError("its config is not a Functional model")
    layers = config.get("config", {}).get("layers")
    if not isinstance(layers, list) or not all(isinstance(layer, dict) for layer in layers):
        raise ValueError("its config lists no layers")
    return [str(layer.get("class_name")) for layer in layers]
