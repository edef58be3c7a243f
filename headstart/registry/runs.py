"""Run directories: the files one training run leaves behind (`RUN_FILES`, what a complete run
holds), and `Run`, which reads one. headstart.registry.run_writer writes them. TensorFlow is
imported only where a model is loaded, so that reading a run's figures stays cheap.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from headstart.backbone.handles import Backbone
from headstart.errors import HeadstartError, first_line
from headstart.infra.storage import write_json_atomic
from headstart.registry import published
from headstart.registry.lineage import Lineage
from headstart.training.fine_tuning import FineTuningSummary

MODEL_FILE = "model.keras"
SERVING_DIR = "saved_model"
BACKBONE_DIR = "backbone"
# The backbone quantized to int8, in a run trained on its features: what predicts with the run.
INT8_BACKBONE_FILE = "backbone-int8.tflite"
CLASS_NAMES_FILE = "class_names.json"
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.json"
DATA_REPORT_FILE = "data_report.json"
CONFIG_FILE = "config.json"
MODEL_CARD_FILE = "MODEL_CARD.md"
LINEAGE_FILE = "lineage.json"
DATA_INDEX_FILE = "data_index.parquet"
# Each validation and test image's top probability and whether it was right: what a threshold for a
# target accuracy is chosen from (headstart.evaluation.calibration).
CONFIDENCE_FILE = "confidence.parquet"
# The training images flagged as probably mislabelled (headstart.evaluation.label_issues); a run
# trained with the check off has none.
LABEL_ISSUES_FILE = "label_issues.parquet"
PLOTS_DIR = "plots"
# Everything a run holds.
RUN_FILES = (
    MODEL_FILE,
    SERVING_DIR,
    BACKBONE_DIR,
    CLASS_NAMES_FILE,
    METRICS_FILE,
    HISTORY_FILE,
    DATA_REPORT_FILE,
    CONFIG_FILE,
    MODEL_CARD_FILE,
    LINEAGE_FILE,
    DATA_INDEX_FILE,
    CONFIDENCE_FILE,
    PLOTS_DIR,
    LABEL_ISSUES_FILE,
)
# What a complete run holds: runs written before the data index or the confidences existed are
# complete too, and a run trained without the label-issue check has no label_issues.parquet.
REQUIRED_RUN_FILES = tuple(
    name for name in RUN_FILES if name not in (DATA_INDEX_FILE, CONFIDENCE_FILE, LABEL_ISSUES_FILE)
)


class DamagedRun(HeadstartError):
    """A run's metadata file that cannot be read: that run (version) is unusable, never the registry."""

    def __init__(self, path: Path, problem: str):
        self.path, self.problem = Path(path), problem
        super().__init__(
            f"{path} {problem}: the run {Path(path).parent.name} is damaged; "
            "restore the file, or use another version (`headstart models` lists them)"
        )


class Run:
    """A finished run directory, read on demand: its classes, figures, configuration and models."""

    def __init__(self, path: Path):
        self.path = Path(path)
        for required in (CLASS_NAMES_FILE, CONFIG_FILE):
            if not (self.path / required).is_file():
                raise HeadstartError(f"{self.path} is not a headstart run directory (no {required})")

    @classmethod
    def if_complete(cls, path: Path) -> "Run | None":
        """The run at path where it holds every one of REQUIRED_RUN_FILES; else None."""
        return cls(path) if all((Path(path) / name).exists() for name in REQUIRED_RUN_FILES) else None

    def _json(self, name: str, kind: type = dict):
        """A JSON file of the run, of the given kind; a damaged one (unreadable, not JSON, or not of
        that kind) makes the run unusable, said in one line that names the file."""
        path = self.path / name
        try:
            written = json.loads(path.read_bytes())
        except OSError as error:
            raise DamagedRun(path, f"cannot be read ({error.strerror or error})") from None
        except ValueError:
            raise DamagedRun(path, "is not valid JSON") from None
        if not isinstance(written, kind):
            raise DamagedRun(path, f"holds a JSON {type(written).__name__}, not a {kind.__name__}")
        return written

    @cached_property
    def class_names(self) -> list[str]:
        names = self._json(CLASS_NAMES_FILE, list)
        if not names or not all(isinstance(name, str) and name for name in names):
            raise DamagedRun(self.path / CLASS_NAMES_FILE, "does not hold a list of class names")
        return names

    @cached_property
    def config(self) -> dict:
        return self._json(CONFIG_FILE)

    @cached_property
    def metrics(self) -> dict:
        return self._json(METRICS_FILE)

    def check(self) -> None:
        """Reads every metadata file the registry and the gate rely on (classes, configuration,
        figures, lineage), raising DamagedRun for the first that is damaged."""
        self.class_names, self.config, self.lineage
        metrics = self.metrics
        for figure, kind in (("accuracy", (int, float)), ("n", int)):
            if figure in metrics and not isinstance(metrics[figure], kind):
                raise DamagedRun(self.path / METRICS_FILE, f"holds no usable {figure}")

    def update_metrics(self, change: Callable[[dict], dict]) -> dict:
        """Rewrites metrics.json (atomically) as `change` makes it from what the file holds now,
        read afresh rather than from this Run's copy, since another writer (an export) may have
        written since; returns the new metrics, which this Run reads from then on."""
        metrics = change(self._json(METRICS_FILE))
        write_json_atomic(self.path / METRICS_FILE, metrics)
        self.__dict__["metrics"] = metrics
        self._republish()
        return metrics

    def record_gate(self, decision: dict) -> None:
        """Rewrites the gate's decision in lineage.json (atomically): the decision the run was
        published with changes where the champion changed before it could be promoted."""
        written = self._json(LINEAGE_FILE)
        write_json_atomic(self.path / LINEAGE_FILE, {**written, "gate": decision})
        self.__dict__.pop("lineage", None)
        self._republish()

    def _republish(self) -> None:
        """A run of a registry on a store is this machine's copy of it: what changed here is
        published again, so that every machine reads the run as it is now."""
        store = published.store_of(self.path)
        if store is not None:
            published.publish(store, self.path)

    @property
    def fine_tuning(self) -> FineTuningSummary | None:
        """What fine-tuning did, where the run fine-tuned its backbone; else None."""
        written = self.metrics.get("fine_tuning")
        return FineTuningSummary.from_dict(written) if written is not None else None

    @cached_property
    def history(self) -> dict:
        return self._json(HISTORY_FILE)

    @cached_property
    def data_report(self) -> dict:
        return self._json(DATA_REPORT_FILE)

    @cached_property
    def lineage(self) -> Lineage | None:
        """The lineage record; None for a run written before runs had one."""
        if not (self.path / LINEAGE_FILE).is_file():
            return None
        try:
            return Lineage.from_dict(self._json(LINEAGE_FILE))
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise DamagedRun(
                self.path / LINEAGE_FILE, f"is not a lineage record ({type(error).__name__}: {error})"
            ) from None

    def data_index(self):
        """Each training image's content hash, class and split (a pyarrow Table); None for a run
        written before runs kept one."""
        path = self.path / DATA_INDEX_FILE
        return pq.read_table(path) if path.is_file() else None

    def confidences(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """The split's (validation or test) top probabilities and whether each was right, as the
        run's own model gave them; a run written before runs kept them is refused in one line."""
        path = self.path / CONFIDENCE_FILE
        if not path.is_file():
            raise HeadstartError(
                f"{self.path.name} was trained before runs kept their confidences ({CONFIDENCE_FILE}): "
                "give --min-confidence, or train it again"
            )
        table = pq.read_table(path, filters=[("split", "=", split)])
        return table.column("confidence").to_numpy(), table.column("correct").to_numpy()

    @property
    def unsure_threshold(self) -> float | None:
        """The confidence below which the run's predictions say 'unsure', chosen when it was
        trained (train --target-accuracy); None where it labels every image."""
        return self.metrics.get("unsure", {}).get("threshold")

    def label_issues(self):
        """The training images flagged as probably mislabelled, most likely first (a pyarrow Table);
        None for a run trained without the check."""
        path = self.path / LABEL_ISSUES_FILE
        if not path.is_file():
            return None
        try:
            return pq.read_table(path)
        except (OSError, pa.ArrowException) as error:
            raise DamagedRun(path, f"cannot be read ({first_line(error)})") from None

    def split_hashes(self, split: str) -> set[str] | None:
        """Content hashes of the images the run had in a split (from its data index); None for a
        run written before runs kept one."""
        index = self.data_index()
        if index is None:
            return None
        return {
            sha
            for sha, in_split in zip(index.column("sha256").to_pylist(), index.column("split").to_pylist())
            if in_split == split
        }

    @property
    def image_size(self) -> int:
        return int(self.config["image_size"])

    @property
    def backbone(self) -> Backbone:
        """The backbone module the run's model holds, under the fingerprint it was trained with; with
        the int8 model that made its features where it was trained on the litert-int8 engine."""
        int8_model = self.path / INT8_BACKBONE_FILE
        return Backbone(
            handle=self.config["backbone"],
            module_path=self.path / BACKBONE_DIR,
            fingerprint=self.config["backbone_fingerprint"],
            image_size=self.image_size,
            litert_model=int8_model if int8_model.is_file() else None,
        )

    @property
    def model_card(self) -> str:
        return (self.path / MODEL_CARD_FILE).read_text()

    def plots(self) -> list[Path]:
        return sorted((self.path / PLOTS_DIR).glob("*.png"))

    def head_weights(self) -> tuple[np.ndarray, np.ndarray]:
        """The head's Dense kernel and bias, read as plain arrays from model.keras (nothing in the
        file is run); one per class of class_names.json, or the run is refused in one line."""
        from headstart.registry.model_file import read_head_weights

        kernel, bias = read_head_weights(self.path / MODEL_FILE)
        if kernel.shape[1] != len(self.class_names):
            raise HeadstartError(
                f"{self.path / CLASS_NAMES_FILE} names {len(self.class_names)} classes but "
                f"{self.path / MODEL_FILE} predicts {kernel.shape[1]}: train the run again or promote another version"
            )
        return kernel, bias

    def head(self):
        """The head headstart builds (Dropout → Dense) with this run's weights, on features: what
        scores cached or freshly extracted features, with no backbone loaded."""
        from headstart.training.head import rebuilt_head

        return rebuilt_head(*self.head_weights())

    def keras_model(self):
        """The end-to-end classifier as headstart builds it (headstart.training.head), on the run's
        own backbone module, with the head's weights from model.keras: the file's architecture is
        never deserialised, so no layer it names can run code."""
        from headstart.training.head import HEAD_DENSE, build_classifier

        kernel, bias = self.head_weights()
        # Dropout is off at inference: its rate and seed change no prediction.
        classifier = build_classifier(self.backbone.keras_layer(), kernel.shape[1], self.image_size, 0.0, 0)
        classifier.get_layer(HEAD_DENSE).set_weights([kernel, bias])
        return classifier

    def classifier(self):
        """keras_model as a function images (0–255, any size) → probabilities: what evaluation, the
        gate and export run on raw pixels."""
        from headstart.infra.keras import tf

        model = self.keras_model()
        forward = tf.function(lambda images: model(images, training=False), reduce_retracing=True)

        def predict(images: np.ndarray) -> np.ndarray:
            return forward(tf.convert_to_tensor(images, tf.float32)).numpy()

        return predict

    def serving_model(self):
        """The self-contained serving SavedModel (saved_model/), as a function images (0–255) →
        probabilities. headstart's commands never load it (they rebuild the classifier:
        `classifier`); it is there for whoever serves the run with TensorFlow."""
        serving = self.path / SERVING_DIR
        if not (serving / "saved_model.pb").is_file():
            raise HeadstartError(f"{self.path} has no serving model ({SERVING_DIR}/saved_model.pb)")
        from headstart.infra.keras import tf

        try:
            signature = tf.saved_model.load(str(serving)).signatures["serving_default"]
        except Exception as error:  # SavedModel loading fails in many types; all mean a damaged model.
            raise HeadstartError(
                f"{serving / 'saved_model.pb'} does not load ({first_line(error)}): train the run again"
            ) from None

        def predict(images: np.ndarray) -> np.ndarray:
            return signature(images=tf.convert_to_tensor(images, tf.float32))["probabilities"].numpy()

        return predict
