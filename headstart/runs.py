"""Run directories: everything one training run leaves behind, written atomically.

A run is assembled in a hidden staging directory and renamed into place at the very end, so a
crash never leaves a half-written run: either the whole directory is there or none of it.

Training is deterministic, so a run whose every input is identical to an earlier run's (same
images, labels and splits, same backbone weights, same settings, same headstart version) would
reproduce it exactly; such a run is copied instead of recomputed. TensorFlow is imported only
where a model is saved or loaded, so that this path stays cheap.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path

import numpy as np

from headstart import __version__
from headstart.backbone import Backbone
from headstart.errors import HeadstartError
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

    def save_classifier(self, classifier, backbone: Backbone) -> None:
        """Saves the end-to-end model as .keras and as a self-contained serving SavedModel."""
        from headstart.keras import tf

        shutil.copytree(backbone.module_path, self.staging / BACKBONE_DIR)
        classifier.save(self.staging / MODEL_FILE)

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32, name="images")])
        def serve(images):
            return {"probabilities": classifier(images, training=False)}

        # A bare module holding the signature and the variables it captures: saving the Keras
        # model itself would also serialise every layer, which took 2.3× as long to save and
        # 4× as long to load.
        serving = tf.Module()
        serving.serve = serve
        serving.model_variables = list(classifier.variables)
        tf.saved_model.save(serving, str(self.staging / SERVING_DIR), signatures={"serving_default": serve})

    def copy_run(self, previous: Path) -> None:
        """Fills the staging directory with an earlier run's files (hard links where possible)."""
        def link_or_copy(source, destination):
            try:
                os.link(source, destination)
            except OSError:
                shutil.copy2(source, destination)

        shutil.rmtree(self.staging)
        shutil.copytree(previous, self.staging, copy_function=link_or_copy)
        config = json.loads((self.staging / CONFIG_FILE).read_text())
        (self.staging / CONFIG_FILE).unlink()  # a link: rewrite it without touching the earlier run
        self.write_json(CONFIG_FILE, {**config, "reused_from": str(previous)})

    def commit(self) -> Path:
        os.replace(self.staging, self.final)
        return self.final

    def abandon(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


def training_key(config, manifest_fingerprint: str, backbone: Backbone) -> str:
    """Hashes everything that decides a run's model and metrics."""
    decisive = {
        "manifest": manifest_fingerprint, "backbone": backbone.fingerprint, "headstart": __version__,
        **{name: getattr(config, name) for name in ("image_size", "epochs", "batch_size", "dropout", "learning_rate", "patience", "seed")},
    }
    return hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()[:20]


def _run_index(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / "runs" / f"{key}.json"


def record_run(cache_dir: Path, key: str, run_dir: Path) -> None:
    write_json_atomic(_run_index(cache_dir, key), {"run_dir": str(run_dir)})


def find_identical_run(cache_dir: Path, key: str) -> Path | None:
    """An earlier, complete run with the same training key, if one is still on disk."""
    index = _run_index(cache_dir, key)
    if not index.is_file():
        return None
    run_dir = Path(json.loads(index.read_text())["run_dir"])
    required = (MODEL_FILE, SERVING_DIR, BACKBONE_DIR, CLASS_NAMES_FILE, METRICS_FILE, HISTORY_FILE, CONFIG_FILE, MODEL_CARD_FILE, PLOTS_DIR)
    if not all((run_dir / name).exists() for name in required):
        return None
    if json.loads((run_dir / CONFIG_FILE).read_text()).get("training_key") != key:
        return None
    return run_dir


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
    from headstart.keras import tf

    loaded = tf.saved_model.load(str(serving))
    signature = loaded.signatures["serving_default"]

    def predict(images: np.ndarray) -> np.ndarray:
        return signature(images=tf.convert_to_tensor(images, tf.float32))["probabilities"].numpy()

    return predict, class_names


def load_keras_model(run_dir: Path):
    """Loads the run's .keras model with its backbone taken from the run directory itself."""
    from headstart.keras import hub, keras
    from headstart.model import ImagePreprocessing

    run_dir = Path(run_dir)

    class RunBackbone(hub.KerasLayer):
        @classmethod
        def from_config(cls, layer_config):
            return hub.KerasLayer(**{**layer_config, "handle": str(run_dir / BACKBONE_DIR)})

    return keras.models.load_model(
        run_dir / MODEL_FILE,
        custom_objects={"KerasLayer": RunBackbone, "ImagePreprocessing": ImagePreprocessing},
    )
