"""Fine-tuning the top of the bundled MobileNetV2, cheaply: on activations cached at a cut point.

The network is cut before one of its stages (headstart.backbone.mobilenet). The stages below the
cut stay frozen, so what they compute for an image never changes: it is computed once per image
(and once per horizontally flipped image) and cached, keyed like the feature cache by content
hash, backbone fingerprint and image size, and by the cut. Each fine-tuning epoch then runs only
the stages above the cut, with the head trained on frozen features before. What fine-tuning
yields is a whole network again (every stage, the lower ones bit for bit the bundled ones),
exported as a TF Hub module: the run's backbone, which extraction, evaluation, predict and every
later consumer load like any other.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from headstart.backbone.handles import CHECKPOINT_SHA256_PREFIX, Backbone, bundled_checkpoint_path, verified_module
from headstart.config import BUNDLED_HANDLE, FineTuningConfig, HeadConfig
from headstart.data.preprocessing import decoded_batches
from headstart.errors import HeadstartError
from headstart.features.cache import FeatureCache
from headstart.features.encoding import column_matrix
from headstart.infra.storage import remove_stale_temporaries

logger = logging.getLogger("headstart")

# What an activation cache stores: half precision halves its size, and changes what the trained
# network scores by less than the noise of a validation split (benchmarks/results/fine-tuning.md).
ACTIVATION_DTYPE = "<f2"
FLIPPED_SUFFIX = "+hflip"


class ActivationCache(FeatureCache):
    """Per-image activations entering stage `cut` of a backbone, in Parquet shards under
    cache_dir/activations/<fingerprint>-<size>px-into-stage-<cut>/: an image's entry is its content
    hash, its horizontal mirror's the hash followed by FLIPPED_SUFFIX."""

    VALUE_DTYPE = ACTIVATION_DTYPE

    def __init__(self, cache_dir: Path, backbone: Backbone, cut: int):
        self.directory = (
            Path(cache_dir) / "activations" / f"{backbone.fingerprint}-{backbone.image_size}px-into-stage-{cut}"
        )

    def load(self, keys: list[str], shape: tuple[int, ...]) -> np.ndarray:
        """The cached activations of each entry in `keys`, in that order, as [n, *shape] float16;
        HeadstartError where one is missing (a shard found damaged on the way is dropped)."""
        row_of = {key: row for row, key in enumerate(keys)}
        activations = np.empty((len(keys), *shape), np.float16)
        found = np.zeros(len(keys), bool)
        for shard in self.shard_paths():
            table = self.read_shard(shard)
            if table is None:
                continue
            values = column_matrix(table.column("features").combine_chunks(), self.VALUE_DTYPE)
            for index, key in enumerate(table.column("sha256").to_pylist()):
                row = row_of.get(key)
                if row is not None:
                    activations[row] = values[index].reshape(shape)
                    found[row] = True
        if not found.all():
            raise HeadstartError(
                f"activation cache {self.directory} lacks {int((~found).sum())} of {len(keys)} entries"
            )
        return activations


def entry_key(content_hash: str, flipped: bool) -> str:
    return content_hash + FLIPPED_SUFFIX if flipped else content_hash


@dataclass(frozen=True)
class Entry:
    """One image to pass through the lower stages: its cache key, content hash, path and orientation."""

    key: str
    content_hash: str
    path: str
    flipped: bool = False


class SplitBackbone:
    """The bundled backbone cut before stage `cut`: `lower` (normalised images → activations
    entering the stage, frozen) and `upper` (those activations → features, what fine-tuning trains)."""

    def __init__(self, backbone: Backbone, cut: int):
        if backbone.handle != BUNDLED_HANDLE:
            raise HeadstartError(
                f"fine-tuning needs the bundled backbone ({BUNDLED_HANDLE}), whose stages headstart can cut apart; "
                f"{backbone.handle} is a module it can only run whole"
            )
        from headstart.backbone.checkpoint import read_legacy_checkpoint
        from headstart.backbone.mobilenet import build_mobilenet_v2_split

        self.backbone, self.cut = backbone, cut
        self.state = read_legacy_checkpoint(bundled_checkpoint_path(), CHECKPOINT_SHA256_PREFIX)
        self.lower, self.upper = build_mobilenet_v2_split(self.state, cut)
        self.activation_shape = tuple(
            int(d) for d in self.lower.compute_output_shape((1, backbone.image_size, backbone.image_size, 3))[1:]
        )
        self._lower_pass = None

    def activations(self, images: list[np.ndarray], flipped: list[bool]) -> np.ndarray:
        """The lower stages' output for float images in [0, 1] (any sizes), each mirrored where `flipped`,
        resized and normalised exactly as the backbone module does it."""
        from headstart.data.preprocessing import imagenet_normalization, resize_batch
        from headstart.infra.keras import tf

        if self._lower_pass is None:
            normalize = imagenet_normalization()
            size = self.backbone.image_size
            self._lower_pass = tf.function(
                lambda batch: self.lower(normalize(batch), training=False),
                input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)],
            )
        batch = resize_batch(images, self.backbone.image_size)
        batch = np.where(np.asarray(flipped)[:, None, None, None], batch[:, :, ::-1, :], batch)
        return self._lower_pass(tf.constant(batch)).numpy()

    def export(self, destination: Path, handle: str, mirror_average: bool = False) -> Backbone:
        """The whole network, the upper stages as trained now, written as a TF Hub module: a Backbone
        (with `mirror_average`, one whose features are those of the image and of its mirror, averaged).

        Its fingerprint hashes the base module's fingerprint, the cut and every weight: the same
        weights always get the same fingerprint. (The module's files would not do: a SavedModel
        names its functions with counters of the process that traced them.)"""
        from headstart.backbone.hub_module import export_hub_module
        from headstart.backbone.mobilenet import build_mobilenet_v2

        network = build_mobilenet_v2(self.state)
        for layer in self.upper.layers:
            if layer.weights:
                network.get_layer(layer.name).set_weights(layer.get_weights())
        digest = hashlib.sha256(
            (
                f"{self.backbone.fingerprint} fine-tuned from stage {self.cut}"
                f"{' mirror-averaged' if mirror_average else ''}"
            ).encode()
        )
        for weight in network.weights:
            digest.update(weight.name.encode())
            digest.update(np.ascontiguousarray(weight.numpy()).tobytes())
        # The cache may hold this export from an identical earlier run (export_hub_module keeps it):
        # it is used only while its files still hash to what was recorded when it was written.
        verified_module(
            Path(destination),
            lambda: export_hub_module(network, self.backbone.image_size, destination, mirror_average),
            "fine-tuned backbone",
            "exported again",
        )
        return Backbone(
            handle=handle,
            module_path=Path(destination),
            fingerprint=digest.hexdigest()[:16],
            image_size=self.backbone.image_size,
        )


# Entries per activation-cache shard: ≈ 25 MB at 160 px cut before stage 7, in float16.
ENTRIES_PER_SHARD = 1024


@dataclass(frozen=True)
class CachedActivations:
    """What `cache_activations` did: entries computed now, entries found cached, and the entries
    whose files no longer hold the content they were scanned with, with the reason (not cached)."""

    computed: int
    reused: int
    left_out: list[tuple[Entry, str]]


def cache_activations(
    split: SplitBackbone, cache: ActivationCache, entries: list[Entry], batch_size: int = 64, progress=None
) -> CachedActivations:
    """Computes and caches the activations of every entry not cached yet (clearing, on the way,
    the temporary shards a killed run left: they are never read, but would fill the disk)."""
    remove_stale_temporaries(cache.directory, ".shard-*.tmp")
    cached = cache.cached_hashes()
    missing = [entry for entry in entries if entry.key not in cached]
    if progress is not None:
        progress.update(len(entries) - len(missing))
    left_out = []
    for start in range(0, len(missing), ENTRIES_PER_SHARD):
        shard = missing[start : start + ENTRIES_PER_SHARD]
        keys, outputs = [], []
        for batch in decoded_batches(
            [entry.path for entry in shard],
            split.backbone.image_size,
            batch_size,
            [entry.content_hash for entry in shard],
        ):
            if batch.indices:
                outputs.append(split.activations(batch.images, [shard[index].flipped for index in batch.indices]))
                keys.extend(shard[index].key for index in batch.indices)
            left_out.extend((shard[index], reason) for index, reason in batch.unusable)
            if progress is not None:
                progress.update(len(batch.indices) + len(batch.unusable))
        if keys:
            cache.write_shard(keys, np.concatenate(outputs))
    return CachedActivations(len(missing) - len(left_out), len(entries) - len(missing), left_out)


@dataclass
class TuningData:
    """What fine-tuning trains and selects on: the train split's activations (and their mirrors,
    where flips augment it) and the validation split's, float16, with labels."""

    train: np.ndarray
    train_labels: np.ndarray
    validation: np.ndarray
    validation_labels: np.ndarray
    train_flipped: np.ndarray | None = None


@dataclass
class TuningSettings:
    epochs: int
    batch_size: int
    learning_rate: float
    patience: int
    seed: int
    shift: float = 0.0  # share of the image side by which each training image's cut-point map may move each way
    mixup: float = 0.0  # alpha of the Beta distribution mixup draws its weights from; 0: no mixup
    cutmix: float = 0.0  # alpha of the Beta distribution CutMix draws each batch's kept area from; 0: no CutMix

    @classmethod
    def from_config(cls, fine_tuning: FineTuningConfig, head: HeadConfig) -> "TuningSettings":
        """The settings of the configuration's fine-tuning section (batch size and seed: the head's)."""
        return cls(
            fine_tuning.epochs,
            head.batch_size,
            fine_tuning.learning_rate,
            fine_tuning.patience,
            head.seed,
            fine_tuning.shift,
            fine_tuning.mixup,
            fine_tuning.cutmix,
        )


def activation_entries(features, flip: bool) -> int:
    """How many activation entries fine-tuning needs: the train split (twice, with mirrors) and the validation split."""
    hashes = features.content_hashes()
    return len(hashes["train"]) * (2 if flip else 1) + len(hashes["validation"])


def fine_tune(
    split: SplitBackbone,
    head: tuple,
    data: TuningData,
    settings: TuningSettings,
    on_epoch: Callable[[int, dict[str, list[float]]], None] | None = None,
) -> tuple[dict[str, list[float]], int]:
    """Trains the upper stages and the head (`head`: the classifier's Dropout and Dense layers,
    trained before on frozen features, shared and so updated in place) on the cached activations.

    Adam, its learning rate rising linearly over the first epoch and then decaying on a cosine to 0
    at the last planned epoch, gradients clipped to a global norm of 1. Each epoch takes every
    training image once, mirrored or not at random (deterministic under the seed), and may move
    its cut-point map by up to `shift` of its side (a translation of the image, approximated);
    with `mixup`, each batch is blended with a shuffled copy of itself, activations and labels
    alike, by a weight drawn from Beta(mixup, mixup); with `cutmix`, one rectangle of each batch's
    maps is replaced by the same rectangle of a shuffled copy, its area drawn from Beta(cutmix,
    cutmix), the labels blended by area. After each epoch the validation split is scored; training
    stops after `patience` epochs without a better validation accuracy. The weights kept are
    those of the latest epoch whose validation accuracy is within one standard error of the best
    (`selected_epoch`). Returns the per-epoch history (its validation scores start with
    epoch 0, the network before fine-tuning) and the epoch kept (0: fine-tuning did not help).
    """
    from headstart.infra.keras import keras, tf

    keras.utils.set_random_seed(settings.seed)
    tf.config.experimental.enable_op_determinism()
    dropout, dense = head
    activations = keras.Input(data.train.shape[1:], name="activations")
    model = keras.Model(activations, dense(dropout(split.upper(activations))), name="fine_tuning")
    steps_per_epoch = -(-len(data.train_labels) // settings.batch_size)
    # Warmed up over the first epoch: Adam's first steps at the full rate unsettled the pretrained
    # stages enough to lose what they knew when cut low (training collapsed to chance from stage 4).
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0,
        max(1, (settings.epochs - 1) * steps_per_epoch),
        warmup_target=settings.learning_rate,
        warmup_steps=steps_per_epoch,
    )
    optimizer = keras.optimizers.Adam(schedule, global_clipnorm=1.0)
    cross_entropy = keras.losses.SparseCategoricalCrossentropy()
    soft_cross_entropy = keras.losses.CategoricalCrossentropy()
    shift_cells = shift_in_cells(settings.shift, data.train.shape[1])
    one_hot = np.eye(int(dense.units), dtype=np.float32)

    @tf.function(reduce_retracing=True, autograph=False)
    def step(batch, targets):
        """One optimiser step on a batch and its targets (one-hot, or blended by mixup or CutMix)."""
        with tf.GradientTape() as tape:
            probabilities = model(batch, training=True)
            loss = soft_cross_entropy(targets, probabilities)
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return loss * tf.cast(tf.shape(targets)[0], tf.float32), _correct(tf.argmax(targets, axis=-1), probabilities)

    @tf.function(reduce_retracing=True, autograph=False)
    def score(batch, labels):
        probabilities = model(batch, training=False)
        return cross_entropy(labels, probabilities) * tf.cast(tf.shape(labels)[0], tf.float32), _correct(
            labels, probabilities
        )

    def validate() -> tuple[float, float]:
        sums = np.zeros(2)
        for start in range(0, len(data.validation_labels), 256):
            rows = slice(start, start + 256)
            sums += [
                float(value) for value in score(data.validation[rows].astype(np.float32), data.validation_labels[rows])
            ]
        return float(sums[0] / len(data.validation_labels)), float(sums[1] / len(data.validation_labels))

    history: dict[str, list[float]] = {"loss": [], "accuracy": [], "val_loss": [], "val_accuracy": [], "seconds": []}
    validation_loss, best_accuracy = validate()
    history["val_loss"].append(validation_loss)
    history["val_accuracy"].append(best_accuracy)
    weights, epochs_without_improvement = [model.get_weights()], 0
    for epoch in range(1, settings.epochs + 1):
        started = time.perf_counter()
        generator = np.random.default_rng([settings.seed, epoch])
        order = generator.permutation(len(data.train_labels))
        mirrored = generator.random(len(order)) < 0.5 if data.train_flipped is not None else None
        loss_sum = correct = 0.0
        for start in range(0, len(order), settings.batch_size):
            rows = order[start : start + settings.batch_size]
            batch = data.train[rows]
            if mirrored is not None:
                batch = np.where(mirrored[rows][:, None, None, None], data.train_flipped[rows], batch)
            if shift_cells:
                batch = _shifted(batch, shift_cells, generator)
            batch, targets = batch.astype(np.float32), one_hot[data.train_labels[rows]]
            if settings.mixup:
                weight, partners = generator.beta(settings.mixup, settings.mixup), generator.permutation(len(rows))
                batch, targets = (
                    weight * batch + (1 - weight) * batch[partners],
                    weight * targets + (1 - weight) * targets[partners],
                )
            if settings.cutmix:
                batch, targets = _cut_and_mixed(batch, targets, settings.cutmix, generator)
            batch_loss, batch_correct = step(batch, targets)
            loss_sum, correct = loss_sum + float(batch_loss), correct + float(batch_correct)
        history["loss"].append(loss_sum / len(order))
        history["accuracy"].append(correct / len(order))
        validation_loss, validation_accuracy = validate()
        history["val_loss"].append(validation_loss)
        history["val_accuracy"].append(validation_accuracy)
        history["seconds"].append(time.perf_counter() - started)
        if on_epoch is not None:
            on_epoch(epoch, history)
        weights.append(model.get_weights())
        if validation_accuracy > best_accuracy:
            best_accuracy, epochs_without_improvement = validation_accuracy, 0
        else:
            epochs_without_improvement += 1
            if epochs_without_improvement >= settings.patience:
                break
    kept = selected_epoch(history["val_accuracy"], len(data.validation_labels))
    model.set_weights(weights[kept])
    return history, kept


def selected_epoch(validation_accuracy: list[float], images: int) -> int:
    """The latest epoch whose validation accuracy is within one standard error of the best.

    On a validation split of a thousand images an epoch's accuracy moves by a point by chance;
    the very best is then often a spike in the middle of training, at a high learning rate,
    that the test split does not confirm (the README's fine-tuning study has such a run). Later
    epochs, as good within that noise, have had the learning rate decay."""
    best = max(validation_accuracy)
    standard_error = (best * (1 - best) / max(images, 1)) ** 0.5
    return max(epoch for epoch, accuracy in enumerate(validation_accuracy) if accuracy >= best - standard_error)


def shift_in_cells(shift: float, side: int) -> int:
    """A shift given as a share of the image side, in cells of a cut-point map `side` cells wide."""
    return int(round(shift * side))


def _shifted(batch: np.ndarray, cells: int, generator: np.random.Generator) -> np.ndarray:
    """Each map of the batch moved by up to `cells` each way, the edge repeated into the gap: the
    cut-point counterpart of translating the images."""
    moves = generator.integers(0, 2 * cells + 1, size=(len(batch), 2))
    padded = np.pad(batch, ((0, 0), (cells, cells), (cells, cells), (0, 0)), mode="edge")
    height, width = batch.shape[1:3]
    return np.stack([image[dy : dy + height, dx : dx + width] for image, (dy, dx) in zip(padded, moves)])


def _cut_and_mixed(batch: np.ndarray, targets: np.ndarray, alpha: float, generator: np.random.Generator):
    """CutMix on cut-point maps: one rectangle of every map replaced by the same rectangle of
    another map of the batch, the targets blended by the area each keeps."""
    height, width = batch.shape[1:3]
    side = np.sqrt(1 - generator.beta(alpha, alpha))
    centre_y, centre_x = generator.integers(0, height), generator.integers(0, width)
    top, bottom = np.clip([centre_y - round(side * height / 2), centre_y + round(side * height / 2)], 0, height)
    left, right = np.clip([centre_x - round(side * width / 2), centre_x + round(side * width / 2)], 0, width)
    partners = generator.permutation(len(batch))
    mixed = batch.copy()
    mixed[:, top:bottom, left:right] = batch[partners, top:bottom, left:right]
    kept = 1 - (bottom - top) * (right - left) / (height * width)
    return mixed, kept * targets + (1 - kept) * targets[partners]


def _correct(labels, probabilities):
    from headstart.infra.keras import tf

    return tf.reduce_sum(tf.cast(tf.equal(tf.argmax(probabilities, axis=-1), tf.cast(labels, tf.int64)), tf.float32))


@dataclass(frozen=True)
class ActivationCounts:
    """The activation cache's part in a fine-tuning run: entries computed, entries found cached, and
    the seconds it took."""

    computed: int
    reused: int
    seconds: float

    def to_dict(self) -> dict:
        return {"computed": self.computed, "reused": self.reused, "seconds": self.seconds}

    @classmethod
    def from_dict(cls, written: dict) -> "ActivationCounts":
        return cls(written["computed"], written["reused"], written["seconds"])


@dataclass(frozen=True)
class BaseBackbone:
    """The backbone fine-tuning started from."""

    handle: str
    fingerprint: str

    def to_dict(self) -> dict:
        return {"handle": self.handle, "fingerprint": self.fingerprint}

    @classmethod
    def from_dict(cls, written: dict) -> "BaseBackbone":
        return cls(written["handle"], written["fingerprint"])


@dataclass(frozen=True)
class LeftOutImage:
    """An image fine-tuning left out: its file no longer held the content it was scanned with."""

    content_hash: str
    path: str
    reason: str

    def to_list(self) -> list[str]:
        return [self.content_hash, self.path, self.reason]


@dataclass(frozen=True)
class FineTuningSummary:
    """What a fine-tuning run did, as metrics.json keeps it (under `fine_tuning`) and the model card
    and the report tell it: the cut, the augmentation, the epochs and what they scored.

    Runs written before an option existed lack its key: they read as not using it (no mixup, no
    CutMix, no mirror averaging), and `shift_cells` as None (those runs gave `shift` in cells)."""

    from_stage: int
    image_size: int
    activation_shape: tuple[int, ...]
    activation_dtype: str
    flip: bool
    shift: float
    epochs_run: int
    best_epoch: int
    validation_accuracy_before: float
    validation_accuracy_after: float
    seconds_per_epoch: float
    activations: ActivationCounts
    base_backbone: BaseBackbone
    left_out: tuple[LeftOutImage, ...]
    shift_cells: int | None = None
    mixup: float = 0.0
    cutmix: float = 0.0
    mirror_average: bool = False

    def to_dict(self) -> dict:
        return {
            "from_stage": self.from_stage,
            "image_size": self.image_size,
            "activation_shape": list(self.activation_shape),
            "activation_dtype": self.activation_dtype,
            "flip": self.flip,
            "shift": self.shift,
            "shift_cells": self.shift_cells,
            "mixup": self.mixup,
            "cutmix": self.cutmix,
            "mirror_average": self.mirror_average,
            "epochs_run": self.epochs_run,
            "best_epoch": self.best_epoch,
            "validation_accuracy_before": self.validation_accuracy_before,
            "validation_accuracy_after": self.validation_accuracy_after,
            "seconds_per_epoch": self.seconds_per_epoch,
            "activations": self.activations.to_dict(),
            "base_backbone": self.base_backbone.to_dict(),
            "left_out": [image.to_list() for image in self.left_out],
        }

    @classmethod
    def from_dict(cls, written: dict) -> "FineTuningSummary":
        return cls(
            from_stage=written["from_stage"],
            image_size=written["image_size"],
            activation_shape=tuple(written["activation_shape"]),
            activation_dtype=written["activation_dtype"],
            flip=written["flip"],
            shift=written["shift"],
            epochs_run=written["epochs_run"],
            best_epoch=written["best_epoch"],
            validation_accuracy_before=written["validation_accuracy_before"],
            validation_accuracy_after=written["validation_accuracy_after"],
            seconds_per_epoch=written["seconds_per_epoch"],
            activations=ActivationCounts.from_dict(written["activations"]),
            base_backbone=BaseBackbone.from_dict(written["base_backbone"]),
            left_out=tuple(LeftOutImage(*image) for image in written["left_out"]),
            shift_cells=written.get("shift_cells"),
            mixup=written.get("mixup", 0.0),
            cutmix=written.get("cutmix", 0.0),
            mirror_average=written.get("mirror_average", False),
        )

    def outcome(self) -> str:
        """One line: epochs run, the epoch kept, and the validation accuracy before and after."""
        return (
            f"{self.epochs_run} epochs, best {self.best_epoch}: validation accuracy "
            f"{self.validation_accuracy_before:.4f} → {self.validation_accuracy_after:.4f}"
        )


@dataclass(frozen=True)
class FineTuningResult:
    """What fine-tuning made: the fine-tuned backbone (a TF Hub module, the run's backbone from now
    on), its per-epoch history, and a summary for metrics.json and the model card."""

    backbone: Backbone
    history: dict
    summary: FineTuningSummary

    def outcome(self) -> str:
        return self.summary.outcome()


def fine_tune_classifier(
    classifier,
    backbone: Backbone,
    features,
    cache_dir: Path,
    destination: Path,
    cut: int,
    settings: TuningSettings,
    flip: bool,
    mirror_average: bool = False,
    activation_progress=None,
    on_epoch=None,
) -> FineTuningResult:
    """Fine-tunes the bundled backbone from stage `cut` up together with the classifier's head
    (trained before on frozen features; updated in place), on the train split's cached activations
    (and their mirrors, where `flip`), selecting on the validation split. The test split is not read.
    The fine-tuned network is written to `destination` as a TF Hub module (averaging the features of
    each image and its mirror image, where `mirror_average`)."""
    from headstart.training.head import HEAD_DENSE, HEAD_DROPOUT

    split = SplitBackbone(backbone, cut)
    cache = ActivationCache(cache_dir, backbone, cut)
    rows = {name: features.rows(name, ["sha256", "path", "label"]) for name in ("train", "validation")}
    if not rows["validation"]["sha256"]:
        raise HeadstartError(
            "fine-tuning selects its epoch on the validation split, which is empty: give --validation-fraction > 0"
        )
    images = {
        name: [Entry(sha, sha, path) for sha, path in zip(split_rows["sha256"], split_rows["path"])]
        for name, split_rows in rows.items()
    }
    mirrors = (
        [Entry(entry_key(entry.content_hash, True), entry.content_hash, entry.path, True) for entry in images["train"]]
        if flip
        else []
    )
    entries = images["train"] + mirrors + images["validation"]
    started = time.perf_counter()
    cached = cache_activations(split, cache, entries, progress=activation_progress)
    activation_seconds = time.perf_counter() - started
    gone = {entry.content_hash for entry, _ in cached.left_out}
    for entry, reason in cached.left_out:
        logger.warning("left out of fine-tuning %s: %s", entry.path, reason)

    def kept(name: str, flipped: bool = False) -> tuple[list[str], np.ndarray]:
        pairs = [
            (entry_key(sha, flipped), label)
            for sha, label in zip(rows[name]["sha256"], rows[name]["label"])
            if sha not in gone
        ]
        return [key for key, _ in pairs], np.array([label for _, label in pairs], np.int64)

    train_keys, train_labels = kept("train")
    validation_keys, validation_labels = kept("validation")
    data = TuningData(
        cache.load(train_keys, split.activation_shape),
        train_labels,
        cache.load(validation_keys, split.activation_shape),
        validation_labels,
        cache.load(kept("train", True)[0], split.activation_shape) if flip else None,
    )
    history, best_epoch = fine_tune(
        split, (classifier.get_layer(HEAD_DROPOUT), classifier.get_layer(HEAD_DENSE)), data, settings, on_epoch
    )
    tuned = split.export(destination, f"{backbone.handle} fine-tuned from stage {cut}", mirror_average)
    summary = FineTuningSummary(
        from_stage=cut,
        image_size=backbone.image_size,
        activation_shape=split.activation_shape,
        activation_dtype="float16",
        flip=flip,
        shift=settings.shift,
        shift_cells=shift_in_cells(settings.shift, split.activation_shape[0]),
        mixup=settings.mixup,
        cutmix=settings.cutmix,
        mirror_average=mirror_average,
        epochs_run=len(history["loss"]),
        best_epoch=best_epoch,
        validation_accuracy_before=float(history["val_accuracy"][0]),
        validation_accuracy_after=float(history["val_accuracy"][best_epoch]),
        seconds_per_epoch=float(np.mean(history["seconds"])) if history["seconds"] else 0.0,
        activations=ActivationCounts(cached.computed, cached.reused, activation_seconds),
        base_backbone=BaseBackbone(backbone.handle, backbone.fingerprint),
        left_out=tuple(LeftOutImage(entry.content_hash, entry.path, reason) for entry, reason in cached.left_out),
    )
    return FineTuningResult(tuned, history, summary)
