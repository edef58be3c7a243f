"""The one typed configuration of a training run, shared by the CLI, the flow and deployments.

Every field counts towards a run's training key (what decides whether an earlier run can be
reused, see headstart.registry.reuse) by its value, unless it is marked otherwise: RESULT_NEUTRAL for a
field that cannot change the model or its metrics, THROUGH_MANIFEST or THROUGH_BACKBONE for one
whose effect the manifest's or the backbone's fingerprint already counts, WHEN_FINE_TUNING for a
setting of the fine-tuning stage, which counts only where that stage runs. A new field therefore
counts until someone decides it does not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
DEFAULT_CIFAR10_CLASSES = ("cat", "dog")
DEFAULT_CUT = 4  # fine-tuning from stage 4 (see docs/fine-tuning.md)
# The bundled backbone: ImageNet MobileNetV2, whose stages headstart can cut apart.
BUNDLED_HANDLE = "bundled:mobilenet_v2"
# MobileNetV2's last stage (the final 1×1 convolution, headstart.backbone.stages.HEAD): the
# highest stage fine-tuning can start from.
LAST_STAGE = 18
# Cosine similarity from which a held-out image counts as a near-duplicate of a training image;
# see benchmarks/results/leakage-calibration.md for the measurements behind it.
DEFAULT_NEAR_DUPLICATE_THRESHOLD = 0.88
# What runs the frozen forward pass: auto = LiteRT where it passes its parity check; litert-int8
# = the backbone quantized to int8 on the training images.
Engine = Literal["auto", "litert", "keras", "litert-int8"]
INT8_ENGINE = "litert-int8"


# Marks for the fields that do not count towards the training key by their own value.
THROUGH_MANIFEST = {
    "training_key": "manifest"
}  # what it changes, the manifest's fingerprint shows: the images, labels, splits
THROUGH_BACKBONE = {
    "training_key": "backbone"
}  # the backbone's fingerprint (its exact weights) counts instead of its name
RESULT_NEUTRAL = {
    "training_key": "neutral"
}  # never changes the model or its metrics: engine choice within parity, speed, places
WHEN_FINE_TUNING = {
    "training_key": "fine_tuning"
}  # counts by value where fine_tune is on, and not at all where it is off


class TrainConfig(BaseModel):
    """Everything that decides what a `train` run computes. Unknown fields are rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    data: str = Field(
        json_schema_extra=THROUGH_MANIFEST, description="'cifar10', or a folder with one sub-folder of images per class"
    )
    classes: Optional[tuple[str, ...]] = Field(
        None,
        json_schema_extra=THROUGH_MANIFEST,
        description="classes to learn; default: cat and dog for cifar10, every sub-folder otherwise",
    )
    cifar10_source: str = Field(
        CIFAR10_URL, json_schema_extra=THROUGH_MANIFEST, description="URL or local path of the CIFAR-10 python archive"
    )
    image_size: int = Field(
        160, ge=32, le=512, description="side in pixels the backbone sees (160: see README for the measurement)"
    )
    epochs: int = Field(
        30, ge=1, le=1000, description="maximum epochs; training stops early when validation loss stalls"
    )
    batch_size: int = Field(64, ge=1, le=4096, description="images per step of head training")
    dropout: float = Field(0.2, ge=0.0, lt=1.0, description="dropout rate before the new Dense layer")
    learning_rate: float = Field(1e-3, gt=0.0, le=1.0, description="Adam's learning rate for the head")
    patience: int = Field(5, ge=1, description="epochs without validation improvement before early stopping")
    validation_fraction: float = Field(
        0.1,
        ge=0.0,
        lt=0.5,
        json_schema_extra=THROUGH_MANIFEST,
        description="share of the images held out for validation (early stopping)",
    )
    test_fraction: float = Field(
        0.1,
        gt=0.0,
        lt=0.5,
        json_schema_extra=THROUGH_MANIFEST,
        description="share of a folder source held out for testing",
    )
    max_images_per_class: Optional[int] = Field(
        None, ge=1, json_schema_extra=THROUGH_MANIFEST, description="cap per class, for quick runs"
    )
    seed: int = Field(0, description="seed of the head's initialisation, dropout and shuffling")
    # Counts only where on, like the settings below: the keys of runs without fine-tuning stay
    # what they were before it existed, so their indexed runs are still reused.
    fine_tune: bool = Field(
        False,
        json_schema_extra=WHEN_FINE_TUNING,
        description=(
            "after the head, also train the backbone's stages from --fine-tune-from up, with the head, on activations cached below them"
        ),
    )
    fine_tune_from: int = Field(
        DEFAULT_CUT,
        ge=1,
        le=LAST_STAGE,
        json_schema_extra=WHEN_FINE_TUNING,
        description=(
            "first stage to fine-tune: 1–17 an inverted-residual block, 18 the final 1×1 convolution; the stages below stay frozen"
        ),
    )
    fine_tune_epochs: int = Field(
        8,
        ge=1,
        le=1000,
        json_schema_extra=WHEN_FINE_TUNING,
        description=(
            "fine-tuning epochs (the learning rate decays over them); stops early when validation accuracy stalls"
        ),
    )
    fine_tune_learning_rate: float = Field(
        3e-4,
        gt=0.0,
        le=1.0,
        json_schema_extra=WHEN_FINE_TUNING,
        description="Adam's learning rate for fine-tuning, reached after a one-epoch warm-up, then decayed to 0 on a cosine",
    )
    fine_tune_patience: int = Field(
        3,
        ge=1,
        json_schema_extra=WHEN_FINE_TUNING,
        description="fine-tuning epochs without a better validation accuracy before it stops",
    )
    fine_tune_flip: bool = Field(
        True,
        json_schema_extra=WHEN_FINE_TUNING,
        description="mirror each training image at random in each fine-tuning epoch (both orientations cached)",
    )
    fine_tune_shift: float = Field(
        0.1,
        ge=0.0,
        le=0.25,
        json_schema_extra=WHEN_FINE_TUNING,
        description=(
            "share of the image side by which each training image may move each way in fine-tuning (its cut-point activations are shifted)"
        ),
    )
    fine_tune_mixup: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        json_schema_extra=WHEN_FINE_TUNING,
        description=(
            "mixup in fine-tuning: alpha of the Beta distribution each batch's blend with a shuffled copy of itself is drawn from; 0: off"
        ),
    )
    fine_tune_mirror_average: bool = Field(
        False,
        json_schema_extra=WHEN_FINE_TUNING,
        description=(
            "the fine-tuned backbone averages the features of each image and of its mirror image (twice its work per image)"
        ),
    )
    fine_tune_cutmix: float = Field(
        0.0,
        ge=0.0,
        le=4.0,
        json_schema_extra=WHEN_FINE_TUNING,
        description=(
            "CutMix in fine-tuning: alpha of the Beta distribution the area each batch takes from a shuffled copy of itself is drawn from; 0: off"
        ),
    )
    # Counts by value: it changes no weights, but it decides what metrics.json, data_report.json
    # and the model card say, and a reused run must say what this threshold would have.
    near_duplicate_threshold: float = Field(
        DEFAULT_NEAR_DUPLICATE_THRESHOLD,
        gt=0.0,
        le=1.0,
        description=(
            "cosine similarity of backbone features at or above which a test or validation image counts as a near-duplicate of its "
            "nearest training image (0.88: calibrated for the bundled MobileNetV2 at 160 px, see benchmarks/results/leakage-calibration.md)"
        ),
    )
    backbone: str = Field(
        BUNDLED_HANDLE,
        json_schema_extra=THROUGH_BACKBONE,
        description="'bundled:mobilenet_v2', a TF Hub handle, a SavedModel directory or a URL of a .tar.gz module",
    )
    # litert-int8 changes the features, but through the backbone's fingerprint (see headstart.edge.int8.quantization).
    engine: Engine = Field(
        "auto",
        json_schema_extra=RESULT_NEUTRAL,
        description=(
            "what runs the frozen forward pass; auto = LiteRT where it passes its parity check; litert-int8 = the backbone quantized "
            "to int8 on the training images (other features, cached apart; see the README for what it costs in accuracy)"
        ),
    )
    threads: Optional[int] = Field(
        None, ge=1, json_schema_extra=RESULT_NEUTRAL, description="threads for feature extraction; default: all cores"
    )
    extraction_batch_size: int = Field(
        64, ge=1, le=1024, json_schema_extra=RESULT_NEUTRAL, description="images per forward pass of the backbone"
    )
    extraction_shard_size: int = Field(
        1024,
        ge=1,
        json_schema_extra=RESULT_NEUTRAL,
        description="images per feature-cache shard and per extraction task",
    )
    task_runner: Literal["local", "dask"] = Field(
        "local",
        json_schema_extra=RESULT_NEUTRAL,
        description="where extraction tasks run: this process, or a Dask cluster",
    )
    dask_address: Optional[str] = Field(
        None,
        json_schema_extra=RESULT_NEUTRAL,
        description="scheduler address of an existing Dask cluster (tcp://host:port); default: a local cluster",
    )
    dask_workers: int = Field(
        2,
        ge=1,
        json_schema_extra=RESULT_NEUTRAL,
        description="workers of the local Dask cluster when no address is given",
    )
    reuse_identical_runs: bool = Field(
        True,
        json_schema_extra=RESULT_NEUTRAL,
        description="copy an earlier run whose inputs were all identical instead of retraining",
    )
    gate: bool = Field(
        True,
        json_schema_extra=RESULT_NEUTRAL,
        description="compare the new model with the champion and promote it only when it is not worse",
    )
    gate_tolerance: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        json_schema_extra=RESULT_NEUTRAL,
        description="accuracy the new model may lose against the champion and still be promoted",
    )
    gate_alpha: float = Field(
        0.05,
        gt=0.0,
        lt=1.0,
        json_schema_extra=RESULT_NEUTRAL,
        description="significance level of the McNemar test that keeps a worse model out",
    )
    gate_floor: Optional[float] = Field(
        None,
        ge=0.0,
        le=1.0,
        json_schema_extra=RESULT_NEUTRAL,
        description="accuracy the first model must beat; default: always predicting the most common class",
    )
    export: Literal["none", "tflite"] = Field(
        "none",
        json_schema_extra=RESULT_NEUTRAL,
        description=(
            "after publishing, also write the classifier as .tflite files (float32 and int8, class names inside) into the run's exports/ folder"
        ),
    )
    artifacts_root: Path = Field(
        Path("artifacts"),
        json_schema_extra=RESULT_NEUTRAL,
        description="where run directories and the registry go (relative: to the working directory)",
    )
    cache_dir: Path = Field(
        Path(".cache/headstart"),
        json_schema_extra=RESULT_NEUTRAL,
        description="where downloads, backbones and features are cached",
    )

    @classmethod
    def counted_by_value(cls) -> list[str]:
        """The fields whose values count towards the training key: every one not marked otherwise."""
        return [
            name for name, field in cls.model_fields.items() if not (field.json_schema_extra or {}).get("training_key")
        ]

    def training_values(self) -> dict[str, Any]:
        """Those fields' values, as JSON values, and the fine-tuning settings where it runs."""
        values = self.model_dump(mode="json")
        counted = self.counted_by_value() + (
            [
                name
                for name, field in type(self).model_fields.items()
                if (field.json_schema_extra or {}).get("training_key") == "fine_tuning"
            ]
            if self.fine_tune
            else []
        )
        return {name: values[name] for name in counted}

    @model_validator(mode="after")
    def _fine_tuning_can_run(self):
        if self.fine_tune and self.validation_fraction == 0:
            raise ValueError(
                "fine-tuning selects its best epoch on the validation split: give a validation fraction above 0"
            )
        if self.fine_tune and self.engine == "litert-int8":
            raise ValueError(
                "fine-tuning trains the float backbone; the litert-int8 engine's features come from a frozen int8 one: choose one of them"
            )
        if self.fine_tune and self.backbone != BUNDLED_HANDLE:
            raise ValueError(
                f"fine-tuning needs the bundled backbone ({BUNDLED_HANDLE}), whose stages headstart can cut apart; "
                f"{self.backbone} is a module it can only run whole"
            )
        return self

    @field_validator("classes")
    @classmethod
    def _classes_are_distinct(cls, classes):
        if classes is not None:
            if len(classes) < 2:
                raise ValueError("at least two classes are needed")
            if len(set(classes)) != len(classes):
                raise ValueError("classes must be distinct")
        return classes

    @classmethod
    def smoke(cls, **overrides) -> "TrainConfig":
        """A tiny configuration for tests and demos: small images, few epochs."""
        values = dict(image_size=32, epochs=3, batch_size=16, extraction_batch_size=16)
        values.update(overrides)
        return cls(**values)


class PredictConfig(BaseModel):
    """What a `predict` run labels, with which model, and where the predictions go."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    inputs: tuple[str, ...] = Field(min_length=1, description="image files and folders of images")
    model: str = Field(
        "champion",
        description=(
            "'champion', a version listed by `headstart models`, a run directory, or a .tflite file written by `headstart export` (run with LiteRT alone)"
        ),
    )
    output: Optional[Path] = Field(
        None, description="a .csv or .parquet file for path, label, probability (and the top classes)"
    )
    artifacts_root: Path = Field(Path("artifacts"), description="where the registry's versions are")
    cache_dir: Path = Field(Path(".cache/headstart"), description="where the converted LiteRT model is cached")
    engine: Engine = Field(
        "auto",
        description=(
            "what runs the frozen forward pass; auto = LiteRT where it passes its parity check (a run trained with litert-int8 always runs on it)"
        ),
    )
    threads: Optional[int] = Field(None, ge=1, description="threads for the forward pass; default: all cores")
    batch_size: int = Field(64, ge=1, le=1024, description="images per forward pass")
