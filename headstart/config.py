"""The one typed configuration of a training run, shared by the CLI, the flow and deployments.

The configuration is in sections, one per stage of the pipeline (data, backbone, head,
fine-tuning, evaluation, gate, export, runtime); each step receives the sections it needs. Outside
the code it is one flat set of options with unique names (`epochs`, `fine_tune_epochs`,
`gate_tolerance`, ...): the CLI's options, the flow's parameters (the deployment form, where `--param
epochs=5` overrides one field alone) and a run's config.json all use those flat names, and
`TrainConfig(**flat)` accepts them. A section's field has its flat name as its alias where the two
differ. A new option is therefore one field in one section: the CLI, the flow and the training
key follow from it.

Every field counts towards a run's training key (what decides whether an earlier run can be
reused, see headstart.registry.reuse) by its value, unless it is marked otherwise: RESULT_NEUTRAL
for a field that cannot change the model or its metrics, THROUGH_MANIFEST or THROUGH_BACKBONE for
one whose effect the manifest's or the backbone's fingerprint already counts, WHEN_FINE_TUNING for
a setting of the fine-tuning stage, which counts only where that stage runs. A new field therefore
counts until someone decides it does not.
"""

from __future__ import annotations

import urllib.parse
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator
from pydantic.fields import FieldInfo

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
DEFAULT_CIFAR10_CLASSES = ("cat", "dog")
DEFAULT_CUT = 4  # fine-tuning from stage 4 (see docs/fine-tuning.md)
# The bundled backbone: ImageNet MobileNetV2, whose stages headstart can cut apart.
BUNDLED_HANDLE = "bundled:mobilenet_v2"
# MobileNetV2's last stage (the final 1×1 convolution): the highest stage fine-tuning can start from.
LAST_STAGE = 18
# Cosine similarity from which a held-out image counts as a near-duplicate of a training image;
# see benchmarks/results/leakage-calibration.md for the measurements behind it.
DEFAULT_NEAR_DUPLICATE_THRESHOLD = 0.88
# What runs the frozen forward pass: auto = LiteRT where it passes its parity check; litert-int8
# = the backbone quantized to int8 on the training images.
Engine = Literal["auto", "litert", "keras", "litert-int8"]
INT8_ENGINE = "litert-int8"

# The URL schemes taken as an object store; any other `scheme://` is refused in one line.
STORE_SCHEMES = ("s3", "gs", "gcs", "az", "abfs", "memory")


def is_url(place: Place | None) -> bool:
    """Whether the place is a store URL (a str `scheme://…`), not a local folder."""
    return isinstance(place, str) and "://" in place


def as_place(value) -> Place:
    """A place as headstart keeps it: a store URL as a str without its trailing slash, a
    `file://` URL or any other text as a local Path."""
    if isinstance(value, Path):
        return value
    text = str(value)
    if "://" not in text:
        return Path(text)
    scheme, rest = text.split("://", 1)
    if scheme == "file":
        return Path(urllib.parse.unquote(rest) or "/")
    if scheme not in STORE_SCHEMES:
        raise ValueError(f"{text}: {scheme}:// is not a store headstart knows (use one of {', '.join(STORE_SCHEMES)})")
    if not rest.strip("/"):
        raise ValueError(f"{text} names no bucket")
    return f"{scheme}://{rest.rstrip('/')}"


def shown(place) -> str:
    """A place as people read it: a store URL as it is, a folder as its absolute path."""
    return place if is_url(place) else str(Path(place).absolute())


# A local folder (a Path) or a store URL kept as text (s3://bucket/prefix; file:// is a Path).
Place = Annotated[Union[Path, str], BeforeValidator(as_place)]

# Marks for the fields that do not count towards the training key by their own value.
# What such a field changes, the manifest's fingerprint shows: the images, labels, splits.
THROUGH_MANIFEST = {"training_key": "manifest"}
# The backbone's fingerprint (its exact weights) counts instead of its name.
THROUGH_BACKBONE = {"training_key": "backbone"}
# Never changes the model or its metrics: engine choice within parity, speed, places.
RESULT_NEUTRAL = {"training_key": "neutral"}
# Counts by value where fine_tune is on, and not at all where it is off.
WHEN_FINE_TUNING = {"training_key": "fine_tuning"}


def _mark(field: FieldInfo) -> str | None:
    return (field.json_schema_extra or {}).get("training_key")


class Section(BaseModel):
    """A part of the configuration: frozen, unknown fields rejected, fields settable by their flat
    names (aliases) or their own."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class DataConfig(Section):
    """Where the images come from and how they are split."""

    source: str = Field(
        alias="data",
        json_schema_extra=THROUGH_MANIFEST,
        description="'cifar10', or a folder with one sub-folder of images per class (local, or on a store: s3://bucket/photos)",
    )
    classes: Optional[tuple[str, ...]] = Field(
        None,
        json_schema_extra=THROUGH_MANIFEST,
        description="classes to learn (comma-separated); default: cat and dog for cifar10, every sub-folder otherwise",
    )
    cifar10_source: str = Field(
        CIFAR10_URL, json_schema_extra=THROUGH_MANIFEST, description="URL or local path of the CIFAR-10 python archive"
    )
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

    @field_validator("source")
    @classmethod
    def _source_is_named(cls, source: str) -> str:
        # An empty path means the working directory, whose sub-folders are no classes.
        if not source.strip():
            raise ValueError("give a folder of class sub-folders, or 'cifar10' (an empty path is the current folder)")
        if "://" in source:  # a folder on a store: its scheme must be one headstart knows
            place = as_place(source)
            return place if is_url(place) else str(place)
        return source

    @field_validator("classes")
    @classmethod
    def _classes_are_distinct(cls, classes):
        if classes is not None:
            if len(classes) < 2:
                raise ValueError("at least two classes are needed")
            if len(set(classes)) != len(classes):
                raise ValueError("classes must be distinct")
        return classes


class BackboneConfig(Section):
    """The frozen backbone and how its forward pass (feature extraction) runs."""

    handle: str = Field(
        BUNDLED_HANDLE,
        alias="backbone",
        json_schema_extra=THROUGH_BACKBONE,
        description="'bundled:mobilenet_v2', a TF Hub handle, a SavedModel directory or a URL of a .tar.gz module",
    )
    image_size: int = Field(
        160, ge=32, le=512, description="side in pixels the backbone sees (160: see docs/benchmarks.md)"
    )
    # litert-int8 changes the features, but through the backbone's fingerprint
    # (see headstart.edge.int8.quantization).
    engine: Engine = Field(
        "auto",
        json_schema_extra=RESULT_NEUTRAL,
        description=(
            "what runs the frozen forward pass; auto = LiteRT where it passes its parity check; litert-int8 = the "
            "backbone quantized to int8 on the training images (other features, cached apart; see docs/edge.md)"
        ),
    )
    threads: Optional[int] = Field(
        None, ge=1, json_schema_extra=RESULT_NEUTRAL, description="threads for feature extraction; default: all cores"
    )
    batch_size: int = Field(
        64,
        ge=1,
        le=1024,
        alias="extraction_batch_size",
        json_schema_extra=RESULT_NEUTRAL,
        description="images per forward pass of the backbone",
    )
    shard_size: int = Field(
        1024,
        ge=1,
        alias="extraction_shard_size",
        json_schema_extra=RESULT_NEUTRAL,
        description="images per feature-cache shard and per extraction task",
    )


# Where the train split's largest class has at least this many times the images of its smallest,
# the classes count as imbalanced: class weights turn on (class_weights=auto) and the gate compares
# balanced accuracy. Below it, weighting changes little and accuracy says what people expect.
IMBALANCE_RATIO = 3.0


class HeadConfig(Section):
    """The new Dropout + Dense head, trained on the cached features."""

    epochs: int = Field(
        30, ge=1, le=1000, description="maximum epochs; training stops early when validation loss stalls"
    )
    batch_size: int = Field(64, ge=1, le=4096, description="images per step of head training")
    dropout: float = Field(0.2, ge=0.0, lt=1.0, description="dropout rate before the new Dense layer")
    learning_rate: float = Field(1e-3, gt=0.0, le=1.0, description="Adam's learning rate for the head")
    patience: int = Field(5, ge=1, description="epochs without validation improvement before early stopping")
    weight_decay: float = Field(
        0.0, ge=0.0, le=1.0, description="decoupled weight decay of the head's optimiser (AdamW); 0: plain Adam"
    )
    solver: Literal["adam", "lbfgs"] = Field(
        "adam",
        description=(
            "how the head is fitted: mini-batch Adam with dropout and early stopping, or a logistic regression "
            "by L-BFGS on the whole train split (L2 as scikit-learn's default, C = 1; dropout and epochs unused)"
        ),
    )
    sweep: bool = Field(
        False,
        description=(
            "first try a grid of head settings (learning rate × dropout × weight decay, and the L-BFGS logistic "
            "regression) on the cached features, and train with the best on the validation split (docs/trust.md)"
        ),
    )
    # NumPy's and TensorFlow's seeds are unsigned 32-bit numbers: a larger one fails only once
    # the features are extracted.
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of the head's initialisation, dropout and shuffling")
    class_weights: Literal["auto", "balanced", "none"] = Field(
        "auto",
        description=(
            "weigh each class's images in the loss by total / (classes × its count): 'balanced' always, 'auto' where "
            f"the largest class has {IMBALANCE_RATIO:g}× the images of the smallest or more"
        ),
    )
    calibrate: bool = Field(
        True,
        description=(
            "fit a temperature on the validation split so that the probabilities mean what they say "
            "(labels and accuracy unchanged; see docs/trust.md)"
        ),
    )


class FineTuningConfig(Section):
    """Training the backbone's top stages with the head, after the head alone.

    Its settings count towards the training key only where it runs: the keys of runs without
    fine-tuning stay what they were before it existed, so their indexed runs are still reused."""

    enabled: bool = Field(
        False,
        alias="fine_tune",
        json_schema_extra=WHEN_FINE_TUNING,
        description=(
            "after the head, also train the backbone's stages from --fine-tune-from up, with the head, "
            "on activations cached below them"
        ),
    )
    from_stage: int = Field(
        DEFAULT_CUT,
        ge=1,
        le=LAST_STAGE,
        alias="fine_tune_from",
        json_schema_extra=WHEN_FINE_TUNING,
        description=(
            "first stage to fine-tune: 1–17 an inverted-residual block, 18 the final 1×1 convolution; "
            "the stages below stay frozen"
        ),
    )
    epochs: int = Field(
        8,
        ge=1,
        le=1000,
        alias="fine_tune_epochs",
        json_schema_extra=WHEN_FINE_TUNING,
        description=(
            "fine-tuning epochs (the learning rate decays over them); stops early when validation accuracy stalls"
        ),
    )
    learning_rate: float = Field(
        3e-4,
        gt=0.0,
        le=1.0,
        alias="fine_tune_learning_rate",
        json_schema_extra=WHEN_FINE_TUNING,
        description=(
            "Adam's learning rate for fine-tuning, reached after a one-epoch warm-up, then decayed to 0 on a cosine"
        ),
    )
    patience: int = Field(
        3,
        ge=1,
        alias="fine_tune_patience",
        json_schema_extra=WHEN_FINE_TUNING,
        description="fine-tuning epochs without a better validation accuracy before it stops",
    )
    flip: bool = Field(
        True,
        alias="fine_tune_flip",
        json_schema_extra=WHEN_FINE_TUNING,
        description="mirror each training image at random in each fine-tuning epoch (both orientations cached)",
    )
    shift: float = Field(
        0.1,
        ge=0.0,
        le=0.25,
        alias="fine_tune_shift",
        json_schema_extra=WHEN_FINE_TUNING,
        description=(
            "share of the image side by which each training image may move each way in fine-tuning "
            "(its cut-point activations are shifted)"
        ),
    )
    mixup: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        alias="fine_tune_mixup",
        json_schema_extra=WHEN_FINE_TUNING,
        description=(
            "mixup in fine-tuning: alpha of the Beta distribution each batch's blend with a shuffled copy of "
            "itself is drawn from; 0: off"
        ),
    )
    mirror_average: bool = Field(
        False,
        alias="fine_tune_mirror_average",
        json_schema_extra=WHEN_FINE_TUNING,
        description=(
            "the fine-tuned backbone averages the features of each image and of its mirror image "
            "(twice its work per image)"
        ),
    )
    cutmix: float = Field(
        0.0,
        ge=0.0,
        le=4.0,
        alias="fine_tune_cutmix",
        json_schema_extra=WHEN_FINE_TUNING,
        description=(
            "CutMix in fine-tuning: alpha of the Beta distribution the area each batch takes from a shuffled "
            "copy of itself is drawn from; 0: off"
        ),
    )


class EvaluationConfig(Section):
    """What the evaluation checks besides accuracy."""

    # Counts by value: it changes no weights, but it decides what metrics.json, data_report.json
    # and the model card say, and a reused run must say what this threshold would have.
    near_duplicate_threshold: float = Field(
        DEFAULT_NEAR_DUPLICATE_THRESHOLD,
        gt=0.0,
        le=1.0,
        description=(
            "cosine similarity of backbone features at or above which a test or validation image counts as a "
            "near-duplicate of its nearest training image (0.88: calibrated for the bundled MobileNetV2 at 160 px, "
            "see benchmarks/results/leakage-calibration.md)"
        ),
    )
    # Counts by value: it decides the threshold the run records, which its predictions then use.
    target_accuracy: Optional[float] = Field(
        None,
        gt=0.0,
        lt=1.0,
        description=(
            "choose on the validation split the confidence below which the run's predictions say 'unsure', so that "
            "the images it labels reach this accuracy (e.g. 0.97); default: every image labelled"
        ),
    )
    # These count by value: they decide label_issues.parquet, and drop_label_issues the model itself.
    label_issues: bool = Field(
        True,
        description=(
            "rank the training images whose label is probably wrong (out-of-fold heads and confident learning) "
            "into the run's label_issues.parquet; see docs/trust.md"
        ),
    )
    label_issue_folds: int = Field(
        5, ge=2, le=20, description="folds of the train split, one head each, that score the images they left out"
    )
    drop_label_issues: bool = Field(
        False,
        description=(
            "train the head a second time without the images flagged as probably mislabelled; that head is the "
            "run's model"
        ),
    )

    @model_validator(mode="after")
    def _label_issues_found_to_be_dropped(self):
        if self.drop_label_issues and not self.label_issues:
            raise ValueError("--drop-label-issues leaves out the images the label-issue check flags: keep it on")
        return self


class GateConfig(Section):
    """Whether and when the new model replaces the champion."""

    enabled: bool = Field(
        True,
        alias="gate",
        json_schema_extra=RESULT_NEUTRAL,
        description="compare the new model with the champion and promote it only when it is not worse",
    )
    tolerance: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        alias="gate_tolerance",
        json_schema_extra=RESULT_NEUTRAL,
        description="accuracy the new model may lose against the champion and still be promoted",
    )
    alpha: float = Field(
        0.05,
        gt=0.0,
        lt=1.0,
        alias="gate_alpha",
        json_schema_extra=RESULT_NEUTRAL,
        description="significance level of the McNemar test that keeps a worse model out",
    )
    floor: Optional[float] = Field(
        None,
        ge=0.0,
        le=1.0,
        alias="gate_floor",
        json_schema_extra=RESULT_NEUTRAL,
        description="accuracy the first model must beat; default: always predicting the most common class",
    )


class ExportConfig(Section):
    """Files for phones and boards, written after publishing."""

    format: Literal["none", "tflite"] = Field(
        "none",
        alias="export",
        json_schema_extra=RESULT_NEUTRAL,
        description=(
            "after publishing, also write the classifier as .tflite files (float32 and int8, class names inside) "
            "into the run's exports/ folder"
        ),
    )


class RuntimeConfig(Section):
    """Where things go and where the work runs; never changes a result."""

    artifacts_root: Place = Field(
        Path("artifacts"),
        json_schema_extra=RESULT_NEUTRAL,
        description=(
            "where run directories and the registry go (relative: to the working directory), or a store URL "
            "(s3://bucket/prefix) a team shares"
        ),
    )
    cache_dir: Place = Field(
        Path(".cache/headstart"),
        json_schema_extra=RESULT_NEUTRAL,
        description=(
            "where downloads, backbones and features are cached, or a store URL whose feature cache a team "
            "shares (this machine's copies then go to ~/.cache/headstart)"
        ),
    )
    reuse_identical_runs: bool = Field(
        True,
        json_schema_extra={**RESULT_NEUTRAL, "flag": "--no-reuse"},
        description="copy an earlier run whose inputs were all identical instead of retraining",
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


def flat_name(name: str, field: FieldInfo) -> str:
    """A section field's name outside the code: its alias where it has one."""
    return field.alias or name


class TrainConfig(BaseModel):
    """Everything that decides what a `train` run computes, in sections. Built from sections or from
    the flat options (`TrainConfig(data="photos", epochs=5)`); unknown options are rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    data: DataConfig
    backbone: BackboneConfig = BackboneConfig()
    head: HeadConfig = HeadConfig()
    fine_tuning: FineTuningConfig = FineTuningConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    gate: GateConfig = GateConfig()
    export: ExportConfig = ExportConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    @classmethod
    def options(cls) -> dict[str, tuple[str, str, FieldInfo]]:
        """Every flat option: its name → (section, the section's field name, the field)."""
        found = {}
        for section, holder in cls.model_fields.items():
            for name, field in holder.annotation.model_fields.items():
                found[flat_name(name, field)] = (section, name, field)
        return found

    @model_validator(mode="before")
    @classmethod
    def _sections_from_flat_options(cls, values: Any) -> Any:
        """Flat options go into their sections; a section given whole (a mapping or a section
        object under the section's name) is taken as it is."""
        if not isinstance(values, dict):
            return values
        options, sections = cls.options(), {}
        for key, value in values.items():
            if key in cls.model_fields and isinstance(value, BaseModel):
                value = value.model_dump()
            if key in cls.model_fields and isinstance(value, dict):
                sections.setdefault(key, {}).update(value)
            elif key in options:
                section, name, _ = options[key]
                sections.setdefault(section, {})[name] = value
            else:
                sections[key] = value  # an unknown key is left for "extra forbidden" to name
        return sections

    def flat(self) -> dict[str, Any]:
        """The flat options with their values, as JSON values (a run's config.json)."""
        values = {}
        for section in type(self).model_fields:
            values.update(getattr(self, section).model_dump(mode="json", by_alias=True))
        return values

    def with_options(self, **options) -> "TrainConfig":
        """A copy with some flat options changed, validated again."""
        return type(self)(**{**self.flat(), **options})

    @classmethod
    def counted_by_value(cls) -> list[str]:
        """The options whose values count towards the training key: every one not marked otherwise."""
        return [name for name, (_, _, field) in cls.options().items() if not _mark(field)]

    def training_values(self) -> dict[str, Any]:
        """Those options' values, as JSON values, and the fine-tuning settings where it runs."""
        values = self.flat()
        counted = self.counted_by_value()
        if self.fine_tuning.enabled:
            counted += [name for name, (_, _, field) in self.options().items() if _mark(field) == "fine_tuning"]
        return {name: values[name] for name in counted}

    @model_validator(mode="after")
    def _fine_tuning_can_run(self):
        if not self.fine_tuning.enabled:
            return self
        if self.data.validation_fraction == 0:
            raise ValueError(
                "fine-tuning selects its best epoch on the validation split: give a validation fraction above 0"
            )
        if self.backbone.engine == INT8_ENGINE:
            raise ValueError(
                "fine-tuning trains the float backbone; the litert-int8 engine's features come from a frozen int8 "
                "one: choose one of them"
            )
        if self.evaluation.drop_label_issues:
            raise ValueError(
                "--drop-label-issues leaves the flagged images out of the head's training, not out of fine-tuning: "
                "choose one of them"
            )
        if self.backbone.handle != BUNDLED_HANDLE:
            raise ValueError(
                f"fine-tuning needs the bundled backbone ({BUNDLED_HANDLE}), whose stages headstart can cut apart; "
                f"{self.backbone.handle} is a module it can only run whole"
            )
        return self

    @classmethod
    def smoke(cls, **overrides) -> "TrainConfig":
        """A tiny configuration for tests and demos: small images, few epochs."""
        return cls(**{"image_size": 32, "epochs": 3, "batch_size": 16, "extraction_batch_size": 16, **overrides})


class PredictConfig(BaseModel):
    """What a `predict` run labels, with which model, and where the predictions go."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    inputs: tuple[str, ...] = Field(min_length=1, description="image files and folders of images")
    model: str = Field(
        "champion",
        description=(
            "'champion', a version listed by `headstart models`, a run directory, or a .tflite file written by "
            "`headstart export` (run with LiteRT alone)"
        ),
    )
    output: Optional[Path] = Field(
        None,
        description=(
            "a .csv or .parquet file for path, label, probability (and the top classes); without it the command "
            "prints them, and a flow run writes a new CSV under artifacts_root/predictions"
        ),
    )
    artifacts_root: Place = Field(
        Path("artifacts"), description="where the registry's versions are: a folder, or a store URL"
    )
    cache_dir: Place = Field(Path(".cache/headstart"), description="where the converted LiteRT model is cached")
    engine: Engine = Field(
        "auto",
        description=(
            "what runs the frozen forward pass; auto = LiteRT where it passes its parity check "
            "(a run trained with litert-int8 always runs on it)"
        ),
    )
    threads: Optional[int] = Field(None, ge=1, description="threads for the forward pass; default: all cores")
    batch_size: int = Field(64, ge=1, le=1024, description="images per forward pass")
    min_confidence: Optional[float] = Field(
        None,
        ge=0.0,
        le=1.0,
        description="label 'unsure' every image whose most probable class has a lower probability than this",
    )
    target_accuracy: Optional[float] = Field(
        None,
        gt=0.0,
        lt=1.0,
        description=(
            "label 'unsure' the images below the confidence that reached this accuracy on the model's validation "
            "split; default: the threshold the model was trained with (train --target-accuracy), if any"
        ),
    )

    @model_validator(mode="after")
    def _one_threshold(self) -> "PredictConfig":
        if self.min_confidence is not None and self.target_accuracy is not None:
            raise ValueError("give --min-confidence or --target-accuracy, not both")
        return self

    @field_validator("inputs")
    @classmethod
    def _inputs_are_named(cls, inputs: tuple[str, ...]) -> tuple[str, ...]:
        # An empty path is the working directory: every image under it would be labelled.
        if any(not given.strip() for given in inputs):
            raise ValueError("an empty path among the inputs; give image files or folders")
        return inputs


class EvaluateConfig(BaseModel):
    """What an `evaluate` run measures, on which labelled images."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(description="a run directory written by 'headstart train'")
    data: str = Field(min_length=1, description="a folder with sub-folders named like the model's classes")
    batch_size: int = Field(64, ge=1, le=1024, description="images per forward pass")

    @field_validator("model", "data")
    @classmethod
    def _places_are_named(cls, place: str) -> str:
        if not place.strip():  # an empty path is the working directory
            raise ValueError("an empty path; give a run directory and a folder of class sub-folders")
        return place


class WatchConfig(BaseModel):
    """Which data folder a `watch` run looks at, and where its looks are recorded."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    data: str = Field(
        min_length=1,
        description="the folder of class sub-folders to watch (the one a retrain trains on)",
    )
    cache_dir: Path = Field(
        Path(".cache/headstart"),
        description="the training runs' cache directory: its scan cache saves reading unchanged files; the looks "
        "are recorded there",
    )

    @field_validator("data")
    @classmethod
    def _folder_is_named(cls, data: str) -> str:
        if not data.strip():  # an empty path is the working directory
            raise ValueError("an empty path; give a folder of class sub-folders")
        if data == "cifar10":
            raise ValueError("the CIFAR-10 archive does not change; give a folder of class sub-folders")
        return data
