"""Run directories: everything one training run leaves behind, written atomically.

A run is assembled in a hidden staging directory and renamed into place at the very end, so a
crash never leaves a half-written run: either the whole directory is there or none of it.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import secrets
import shutil
from pathlib import Path

import numpy as np

from headstart.backbone import Backbone
from headstart.errors import HeadstartError
from headstart.keras import hub, keras, tf
from headstart.model import ImagePreprocessing
from headstart.storage import write_bytes_atomic, write_json_atomic

MODEL_FILE = "model.keras"
SERVING_DIR = "saved_model"
BACKBONE_DIR = "backbone"
CLASS_NAMES_FILE = "class_names.json"
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.json"
DATA_REPORT_FILE = "data_report.json"
CONFIG_FILE = "config.json"
MODEL_CARD_FILE = "MODEL_CARD.md"
PLOTS_DIR = "plots"


def new_run_name() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


class RunWriter:
    """Collects a run's files in a staging directory; `commit` renames it to its final name."""

    def __init__(self, artifacts_root: Path, name: str | None = None):
        self.name = name or new_run_name()
        self.root = Path(artifacts_root)
        self.final = (self.root / self.name).resolve()
        self.staging = self.root / f".{self.name}.partial"
        self.staging.mkdir(parents=True, exist_ok=False)

    def write_json(self, relative: str, value) -> Path:
        write_json_atomic(self.staging / relative, value)
        return self.final / relative

    def write_bytes(self, relative: str, data: bytes) -> Path:
        write_bytes_atomic(self.staging / relative, data)
        return self.final / relative

    def save_classifier(self, classifier: keras.Model, backbone: Backbone) -> None:
        """Saves the end-to-end model as .keras and as a self-contained serving SavedModel."""
        shutil.copytree(backbone.module_path, self.staging / BACKBONE_DIR)
        classifier.save(self.staging / MODEL_FILE)

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32, name="images")])
        def serve(images):
            return {"probabilities": classifier(images, training=False)}

        tf.saved_model.save(classifier, str(self.staging / SERVING_DIR), signatures={"serving_default": serve})

    def commit(self) -> Path:
        os.replace(self.staging, self.final)
        return self.final

    def abandon(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def model_card(config: dict, metrics: dict, data_report: dict, backbone: Backbone, history: dict, engine: str) -> str:
    counts = data_report["counts"]
    split_lines = "\n".join(
        f"| {split} | " + " | ".join(str(counts[split][name]) for name in data_report["class_names"]) + f" | {sum(counts[split].values())} |"
        for split in ("train", "validation", "test")
    )
    per_class = "\n".join(
        f"| {name} | {values['precision']:.4f} | {values['recall']:.4f} | {values['f1']:.4f} | {values['support']} |"
        for name, values in metrics["per_class"].items()
    )
    return f"""# Model card

An image classifier for {', '.join(data_report['class_names'])}, trained by headstart.

## Model
- Backbone: `{backbone.handle}` (fingerprint `{backbone.fingerprint}`), frozen, ImageNet-pretrained; input {backbone.image_size}×{backbone.image_size} px.
- Head: Dropout({config['dropout']}) → Dense({len(data_report['class_names'])}, softmax), trained for {len(history.get('loss', []))} epochs
  (learning rate {config['learning_rate']}, batch size {config['batch_size']}, seed {config['seed']}), on features from the {engine} engine.
- Input: RGB images of any size, pixel values 0–255; output: one probability per class in the order of `{CLASS_NAMES_FILE}`.

## Data
Source: `{data_report['source']}`. Splits are assigned by image content hash and never change between runs.

| split | {' | '.join(data_report['class_names'])} | total |
|---|{'---|' * len(data_report['class_names'])}---|
{split_lines}

{len(data_report['skipped'])} files were skipped (see `{DATA_REPORT_FILE}`).

## Evaluation on the test split
Accuracy **{metrics['accuracy']:.4f}** on {metrics['n']} images, macro F1 {metrics['macro_f1']:.4f}.

| class | precision | recall | F1 | support |
|---|---|---|---|---|
{per_class}

## Limits
The backbone saw ImageNet photos; images far from that (medical scans, drawings, tiny
thumbnails upscaled from {backbone.image_size} px or less) may classify worse than these figures.
Accuracy is measured on held-out images of the same source, not on the world at large.
"""


# --- loading a finished run ------------------------------------------------------------------------

def read_class_names(run_dir: Path) -> list[str]:
    path = Path(run_dir) / CLASS_NAMES_FILE
    if not path.is_file():
        raise HeadstartError(f"{run_dir} is not a headstart run directory (no {CLASS_NAMES_FILE})")
    return json.loads(path.read_text())


def load_serving_model(run_dir: Path):
    """The run's self-contained serving SavedModel, as a function images → probabilities."""
    run_dir = Path(run_dir)
    class_names = read_class_names(run_dir)
    serving = run_dir / SERVING_DIR
    if not (serving / "saved_model.pb").is_file():
        raise HeadstartError(f"{run_dir} has no serving model ({SERVING_DIR}/saved_model.pb)")
    loaded = tf.saved_model.load(str(serving))
    signature = loaded.signatures["serving_default"]

    def predict(images: np.ndarray) -> np.ndarray:
        return signature(images=tf.convert_to_tensor(images, tf.float32))["probabilities"].numpy()

    return predict, class_names


def load_keras_model(run_dir: Path) -> keras.Model:
    """Loads the run's .keras model with its backbone taken from the run directory itself."""
    run_dir = Path(run_dir)

    class RunBackbone(hub.KerasLayer):
        @classmethod
        def from_config(cls, layer_config):
            return hub.KerasLayer(**{**layer_config, "handle": str(run_dir / BACKBONE_DIR)})

    return keras.models.load_model(
        run_dir / MODEL_FILE,
        custom_objects={"KerasLayer": RunBackbone, "ImagePreprocessing": ImagePreprocessing},
    )
