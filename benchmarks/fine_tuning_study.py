"""The fine-tuning study: test accuracy and time by image size and cut point, head alone and fine-tuned.

    uv run python benchmarks/fine_tuning_study.py --data /path/to/cifar10-catdog --size 160 --cut 7 [--cut 14 ...]
        [--epochs 8] [--learning-rate 3e-4] [--shift 0.1] [--mixup 0.2] [--no-flip] [--uncached-steps 20]
        [--cache-dir DIR]

For each image size: the dataset's frozen features (extracted as `headstart train` extracts
them, into the same cache), the head trained on them as the flow trains it, and its test
accuracy. Then for each cut: the activations entering that stage (cached: a repeat reuses them),
fine-tuning exactly as `headstart train --fine-tune` runs it (headstart.training.fine_tuning.fine_tune,
selection on the validation split), and the test accuracy of the selected epoch, on the test
split's activations stored in float16 (what the cache holds) and computed in float32 (what the
precision costs). With --head-flips, a head is also trained on the train split and its mirror
images, for what flips give the head alone. Test accuracy after every epoch is printed too, for
the curve; it never steers anything. With --straightforward, the same fine-tuning runs again
without the activation cache, the frozen lower stages computed in every step (images decoded
once and kept), for its accuracy and its time per epoch. With --uncached-steps, a number of
training steps also run the straightforward way, the lower stages computed from decoded images
in every step, for the time an uncached epoch takes.

Each measurement is appended as one JSON line to benchmarks/results/fine-tuning-study.jsonl;
`--table` prints them as the README's table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np

from headstart.backbone.handles import BUNDLED_HANDLE, resolve_backbone
from headstart.config import TrainConfig
from headstart.data.preprocessing import decoded_batches
from headstart.data.sources import prepare_source
from headstart.features.dataset import assemble_features, plan_extraction
from headstart.features.extraction import ExtractionContext, ExtractionSettings
from headstart.infra.keras import keras, tf
from headstart.training.fine_tuning import (
    ActivationCache,
    Entry,
    SplitBackbone,
    TuningData,
    TuningSettings,
    cache_activations,
    entry_key,
    fine_tune,
)
from headstart.training.head import HEAD_DENSE, HEAD_DROPOUT, build_classifier, predict_from_features, train_head

RESULTS = Path(__file__).parent / "results" / "fine-tuning-study.jsonl"
VALIDATION_IMAGES = 967  # the shared set's validation split, for the table's selection


def frozen_features(config: TrainConfig):
    manifest = prepare_source(config.data, config.runtime.cache_dir)[0]
    backbone = resolve_backbone(BUNDLED_HANDLE, config.backbone.image_size, config.runtime.cache_dir)
    started = time.perf_counter()
    with ExtractionContext(config.runtime.cache_dir, ExtractionSettings()) as context:
        for shard in plan_extraction(manifest, backbone, config.runtime.cache_dir):
            context.extract_shard(shard, backbone)
    features = assemble_features(manifest, backbone, config.runtime.cache_dir)
    return backbone, features, time.perf_counter() - started


def head_only(config: TrainConfig, backbone, features):
    classifier = build_classifier(
        backbone.keras_layer(), 2, config.backbone.image_size, config.head.dropout, config.head.seed
    )
    started = time.perf_counter()
    train_head(
        classifier,
        features.stream("train"),
        features.stream("validation"),
        config.head.epochs,
        config.head.batch_size,
        config.head.learning_rate,
        config.head.patience,
        config.head.seed,
    )
    seconds = time.perf_counter() - started
    test_features, test_labels, _ = features.load("test")
    accuracy = float((predict_from_features(classifier, test_features).argmax(1) == test_labels).mean())
    return classifier, accuracy, seconds


def head_with_flips(config: TrainConfig, backbone, features) -> float:
    """Test accuracy of the head trained on the train split and its mirror images (features of
    each mirrored image extracted as extraction does it, not cached), other settings as head_only."""
    train_features, train_labels, paths = features.load("train")
    with ExtractionContext(config.runtime.cache_dir, ExtractionSettings()) as context:
        engine = context.engine(backbone)
        mirrored = np.concatenate(
            [
                engine([image[:, ::-1] for image in batch.images])
                for batch in decoded_batches(paths, config.backbone.image_size, 64)
            ]
        )
    classifier = build_classifier(
        backbone.keras_layer(), 2, config.backbone.image_size, config.head.dropout, config.head.seed
    )
    order = np.random.default_rng(config.head.seed).permutation(2 * len(train_labels))
    both = (np.concatenate([train_features, mirrored])[order], np.concatenate([train_labels, train_labels])[order])
    validation = features.load("validation")
    train_head(
        classifier,
        both,
        validation[:2],
        config.head.epochs,
        config.head.batch_size,
        config.head.learning_rate,
        config.head.patience,
        config.head.seed,
    )
    test_features, test_labels, _ = features.load("test")
    return float((predict_from_features(classifier, test_features).argmax(1) == test_labels).mean())


def accuracy_on(model, activations: np.ndarray, labels: np.ndarray) -> float:
    probabilities = np.concatenate(
        [
            model(activations[start : start + 256].astype(np.float32), training=False).numpy()
            for start in range(0, len(labels), 256)
        ]
    )
    return float((probabilities.argmax(1) == labels).mean())


class ActivationsFromImages:
    """Activations computed from the decoded images at every access, never stored: what fine-tuning
    reads when it runs the straightforward way (the frozen lower stages in every step). Images
    are decoded once and kept (the most favourable uncached way); where `flips`, each access
    mirrors each image at random (seeded)."""

    def __init__(self, split: SplitBackbone, paths: list[str], flips: bool = False, seed: int = 0):
        self.split, self.flips = split, flips
        self.images = [
            image for batch in decoded_batches(paths, split.backbone.image_size, 64) for image in batch.images
        ]
        self.shape = (len(self.images), *split.activation_shape)
        self.generator = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, rows) -> np.ndarray:
        rows = range(*rows.indices(len(self.images))) if isinstance(rows, slice) else rows
        mirrored = self.generator.random(len(rows)) < 0.5 if self.flips else np.zeros(len(rows), bool)
        return self.split.activations([self.images[row] for row in rows], list(mirrored))


def straightforward(
    config: TrainConfig, backbone, features, rows: dict, labels: dict, cut: int, settings: TuningSettings, flip: bool
) -> dict:
    """The same fine-tuning (same head start, same optimiser, same selection) without the
    activation cache; test accuracy from float32 activations."""
    classifier, _, _ = head_only(config, backbone, features)
    split = SplitBackbone(backbone, cut)
    data = TuningData(
        ActivationsFromImages(split, rows["train"]["path"], flip, config.head.seed),
        labels["train"],
        ActivationsFromImages(split, rows["validation"]["path"]),
        labels["validation"],
    )
    head = (classifier.get_layer(HEAD_DROPOUT), classifier.get_layer(HEAD_DENSE))
    history, best = fine_tune(split, head, data, settings)
    test = ActivationsFromImages(split, rows["test"]["path"])
    inputs = keras.Input(split.activation_shape)
    model = keras.Model(inputs, head[1](head[0](split.upper(inputs))))
    return {
        "straightforward_test_accuracy": accuracy_on(model, test[:], labels["test"]),
        "straightforward_best_epoch": best,
        "straightforward_epoch_seconds": history["seconds"],
    }


def uncached_epoch_seconds(split: SplitBackbone, model, rows: dict, steps: int, batch_size: int) -> float:
    """Seconds an epoch takes when every step decodes its images and runs the lower stages too,
    extrapolated from `steps` steps (after one untimed warm-up step)."""
    optimizer = keras.optimizers.Adam(1e-5)
    cross_entropy = keras.losses.SparseCategoricalCrossentropy()

    @tf.function(reduce_retracing=True)
    def step(batch, labels):
        with tf.GradientTape() as tape:
            loss = cross_entropy(labels, model(batch, training=True))
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))

    paths, labels = rows["path"], np.array(rows["label"])
    batches = decoded_batches(paths[: (steps + 1) * batch_size], split.backbone.image_size, batch_size)
    started = None
    for index, batch in enumerate(batches):
        if index == 1:
            started = time.perf_counter()
        activations = split.activations(batch.images, [False] * len(batch.images))
        step(activations, labels[batch.indices])
    return (time.perf_counter() - started) / steps * -(-len(labels) // batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data")
    parser.add_argument("--size", type=int, action="append", default=[])
    parser.add_argument(
        "--table", action="store_true", help="print the results so far as a markdown table, and nothing else"
    )
    parser.add_argument("--cut", type=int, action="append", default=[])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--shift", type=float, default=0.0)
    parser.add_argument("--mixup", type=float, default=0.0)
    parser.add_argument("--cutmix", type=float, default=0.0)
    parser.add_argument("--no-flip", action="store_true")
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--uncached-steps", type=int, default=0)
    parser.add_argument(
        "--head-flips", action="store_true", help="also train a head on the train split and its mirror images"
    )
    parser.add_argument(
        "--straightforward", action="store_true", help="also fine-tune the same way without the activation cache"
    )
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache/headstart"))
    args = parser.parse_args()
    if args.table:
        print(table())
        return
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    ).stdout.strip()
    machine = {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(), "commit": commit}
    flip = not args.no_flip
    for size in args.size:
        config = TrainConfig(data=args.data, image_size=size, cache_dir=args.cache_dir)
        backbone, features, extraction_seconds = frozen_features(config)
        _, head_accuracy, head_seconds = head_only(config, backbone, features)
        record = {
            "size": size,
            "cut": None,
            "test_accuracy": head_accuracy,
            "head_seconds": head_seconds,
            "extraction_seconds": extraction_seconds,
            "test_accuracy_head_with_flips": head_with_flips(config, backbone, features) if args.head_flips else None,
        }
        print(json.dumps(record), flush=True)
        _append({**record, **machine})
        rows = {name: features.rows(name, ["sha256", "path", "label"]) for name in ("train", "validation", "test")}
        for cut in args.cut:
            classifier, _, _ = head_only(config, backbone, features)  # a fresh head, trained as the flow trains it
            split, cache = SplitBackbone(backbone, cut), ActivationCache(config.runtime.cache_dir, backbone, cut)
            entries = [
                Entry(sha, sha, path) for name in rows for sha, path in zip(rows[name]["sha256"], rows[name]["path"])
            ]
            entries += (
                [
                    Entry(entry_key(sha, True), sha, path, True)
                    for sha, path in zip(rows["train"]["sha256"], rows["train"]["path"])
                ]
                if flip
                else []
            )
            started = time.perf_counter()
            cached = cache_activations(split, cache, entries)
            activation_seconds = time.perf_counter() - started

            def load(name: str, flipped: bool = False):
                return cache.load([entry_key(sha, flipped) for sha in rows[name]["sha256"]], split.activation_shape)

            labels = {name: np.array(rows[name]["label"], np.int64) for name in rows}
            data = TuningData(
                load("train"),
                labels["train"],
                load("validation"),
                labels["validation"],
                load("train", True) if flip else None,
            )
            test16 = load("test")
            head = (classifier.get_layer(HEAD_DROPOUT), classifier.get_layer(HEAD_DENSE))
            inputs = keras.Input(split.activation_shape)
            model = keras.Model(inputs, head[1](head[0](split.upper(inputs))))
            test_curve = [accuracy_on(model, test16, labels["test"])]

            def on_epoch(epoch, history):
                test_curve.append(accuracy_on(model, test16, labels["test"]))
                print(
                    f"size {size} cut {cut} epoch {epoch}: {history['seconds'][-1]:.1f} s, "
                    f"loss {history['loss'][-1]:.4f}, "
                    f"validation {history['val_accuracy'][-1]:.4f}, test {test_curve[-1]:.4f}",
                    flush=True,
                )

            settings = TuningSettings(
                args.epochs,
                config.head.batch_size,
                args.learning_rate,
                args.patience,
                config.head.seed,
                args.shift,
                args.mixup,
                args.cutmix,
            )
            history, best = fine_tune(split, head, data, settings, on_epoch)
            # The same test images, their activations computed now in float32, through the selected model.
            test_paths = rows["test"]["path"]
            test32 = np.concatenate(
                [
                    split.activations(batch.images, [False] * len(batch.images))
                    for batch in decoded_batches(test_paths, size, 64)
                ]
            )
            predictions16 = np.concatenate(
                [
                    model(test16[i : i + 256].astype(np.float32), training=False).numpy().argmax(1)
                    for i in range(0, len(test16), 256)
                ]
            )
            predictions32 = np.concatenate(
                [model(test32[i : i + 256], training=False).numpy().argmax(1) for i in range(0, len(test32), 256)]
            )
            # Test-time mirroring, measured only: the features of each image and of its mirror image
            # averaged before the head (for a linear head, the average of the two logits).
            held_out_mirrors = [
                Entry(entry_key(sha, True), sha, path, True)
                for name in ("validation", "test")
                for sha, path in zip(rows[name]["sha256"], rows[name]["path"])
            ]
            cache_activations(split, cache, held_out_mirrors)
            upper = keras.Model(inputs, split.upper(inputs))

            def mirror_averaged_accuracy(name: str) -> float:
                def features_of(activations):
                    return np.concatenate(
                        [
                            upper(activations[i : i + 256].astype(np.float32), training=False).numpy()
                            for i in range(0, len(activations), 256)
                        ]
                    )

                averaged = (features_of(load(name)) + features_of(load(name, True))) / 2
                return float((head[1](averaged).numpy().argmax(1) == labels[name]).mean())

            mirror_averaged = {
                "validation_accuracy_mirror_averaged": mirror_averaged_accuracy("validation"),
                "test_accuracy_mirror_averaged": mirror_averaged_accuracy("test"),
            }
            if args.straightforward:
                record_straightforward = straightforward(config, backbone, features, rows, labels, cut, settings, flip)
            record = {
                "size": size,
                "cut": cut,
                "epochs": args.epochs,
                "learning_rate": args.learning_rate,
                "shift": args.shift,
                "mixup": args.mixup,
                "cutmix": args.cutmix,
                "flip": flip,
                "best_epoch": best,
                "epochs_run": len(history["loss"]),
                "validation_accuracy": history["val_accuracy"][best],
                "test_accuracy": float((predictions16 == labels["test"]).mean()),
                "test_accuracy_float32": float((predictions32 == labels["test"]).mean()),
                "float16_float32_label_agreement": float((predictions16 == predictions32).mean()),
                "test_curve": test_curve,
                "validation_curve": history["val_accuracy"],
                "epoch_seconds": history["seconds"],
                "activation_seconds": activation_seconds,
                "activations_computed": cached.computed,
                "activation_shape": list(split.activation_shape),
                "uncached_epoch_seconds": uncached_epoch_seconds(
                    split, model, rows["train"], args.uncached_steps, config.head.batch_size
                )
                if args.uncached_steps
                else None,
                **mirror_averaged,
                **(record_straightforward if args.straightforward else {}),
            }
            print(json.dumps(record), flush=True)
            _append({**record, **machine})


def table() -> str:
    """The results so far as a markdown table, in the order they were made: the head alone once
    per size, then each fine-tuning, with the epoch headstart keeps (selected_epoch, recomputed
    from the validation curve: runs made under an earlier rule are shown under the current one)."""
    from headstart.training.fine_tuning import selected_epoch

    lines = [
        "| image size | trained | epochs run | augmentation | epoch kept: validation, test "
        "| test after the last epoch | epoch kept, mirror-averaged: validation, test "
        "| test from float32 activations = from float16 | s / epoch | activations, s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    heads = set()
    for record in map(json.loads, RESULTS.read_text().splitlines()):
        if record["cut"] is None:
            if record["size"] not in heads:
                heads.add(record["size"])
                flips = (
                    f" (on images + mirrors: {record['test_accuracy_head_with_flips']:.4f})"
                    if record.get("test_accuracy_head_with_flips")
                    else ""
                )
                lines.append(
                    f"| {record['size']} px | head alone | | | | {record['test_accuracy']:.4f}{flips} | | | | |"
                )
            continue
        if record["epochs"] == 1:
            # A timing run (--epochs 1 --uncached-steps N): its time is in the README's text, not an
            # accuracy row.
            continue
        augmentation = (
            ", ".join(
                name
                for name, on in (
                    ("flips", record["flip"]),
                    (f"shift {record['shift']}", record["shift"]),
                    (f"mixup {record.get('mixup')}", record.get("mixup")),
                    (f"CutMix {record.get('cutmix')}", record.get("cutmix")),
                )
                if on
            )
            or "none"
        )
        kept = selected_epoch(record["validation_curve"], VALIDATION_IMAGES)
        mirrored = (
            f"{record['validation_accuracy_mirror_averaged']:.4f}, {record['test_accuracy_mirror_averaged']:.4f}"
            if "test_accuracy_mirror_averaged" in record
            else ""
        )
        straightforward = (
            f" (the straightforward way: {record['straightforward_test_accuracy']:.4f}, "
            f"{np.mean(record['straightforward_epoch_seconds']):.0f} s / epoch)"
            if "straightforward_test_accuracy" in record
            else ""
        )
        agreement = (
            "yes"
            if record["float16_float32_label_agreement"] == 1.0
            else f"{record['float16_float32_label_agreement']:.4f} of labels"
        )
        lines.append(
            f"| {record['size']} px | from stage {record['cut']} | {record['epochs_run']} of {record['epochs']} "
            f"| {augmentation} | "
            f"{kept}: {record['validation_curve'][kept]:.4f}, **{record['test_curve'][kept]:.4f}**{straightforward} "
            f"| {record['test_curve'][-1]:.4f} | "
            f"{mirrored} | {agreement} | {np.mean(record['epoch_seconds']):.0f} | {record['activation_seconds']:.0f} |"
        )
    return "\n".join(lines)


def _append(record: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as results:
        results.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
