"""The one typed configuration of a training run, shared by the CLI, the flow and deployments."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from headstart.backbone import BUNDLED_HANDLE

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
DEFAULT_CIFAR10_CLASSES = ("cat", "dog")


class TrainConfig(BaseModel):
    """Everything that decides what a `train` run computes. Unknown fields are rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    data: str = Field(description="'cifar10', or a folder with one sub-folder of images per class")
    classes: Optional[tuple[str, ...]] = Field(None, description="classes to learn; default: cat and dog for cifar10, every sub-folder otherwise")
    cifar10_source: str = Field(CIFAR10_URL, description="URL or local path of the CIFAR-10 python archive")
    image_size: int = Field(160, ge=32, le=512, description="side in pixels the backbone sees (160: see README for the measurement)")
    epochs: int = Field(30, ge=1, le=1000, description="maximum epochs; training stops early when validation loss stalls")
    batch_size: int = Field(64, ge=1, le=4096)
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    learning_rate: float = Field(1e-3, gt=0.0, le=1.0)
    patience: int = Field(5, ge=1, description="epochs without validation improvement before early stopping")
    validation_fraction: float = Field(0.1, ge=0.0, lt=0.5)
    test_fraction: float = Field(0.1, gt=0.0, lt=0.5, description="share of a folder source held out for testing")
    max_images_per_class: Optional[int] = Field(None, ge=1, description="cap per class, for quick runs")
    seed: int = 0
    backbone: str = Field(BUNDLED_HANDLE, description="'bundled:mobilenet_v2', a TF Hub handle, a SavedModel directory or a URL of a .tar.gz module")
    engine: Literal["auto", "litert", "keras"] = Field("auto", description="what runs the frozen forward pass; auto = LiteRT where it passes its parity check")
    threads: Optional[int] = Field(None, ge=1, description="threads for feature extraction; default: all cores")
    extraction_batch_size: int = Field(64, ge=1, le=1024)
    extraction_shard_size: int = Field(1024, ge=1, description="images per feature-cache shard and per extraction task")
    task_runner: Literal["local", "dask"] = Field("local", description="where extraction tasks run: this process, or a Dask cluster")
    dask_address: Optional[str] = Field(None, description="scheduler address of an existing Dask cluster (tcp://host:port); default: a local cluster")
    dask_workers: int = Field(2, ge=1, description="workers of the local Dask cluster when no address is given")
    reuse_identical_runs: bool = Field(True, description="copy an earlier run whose inputs were all identical instead of retraining")
    artifacts_root: Path = Path("artifacts")
    cache_dir: Path = Path(".cache/headstart")

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
