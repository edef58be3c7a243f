"""Fine-tuning the bundled backbone's top stages on cached activations: the cache holds what the
lower stages compute, training touches only the stages above the cut, and the fine-tuned model a
run saves serves what evaluation measured."""

import os
import time
from pathlib import Path

import numpy as np
import pytest
from configs import source_of
from conftest import extract_dataset

from headstart.backbone.handles import BUNDLED_HANDLE, resolve_backbone
from headstart.config import TrainConfig
from headstart.data.images import load_image
from headstart.errors import HeadstartError
from headstart.features.extraction import ExtractionContext, ExtractionSettings
from headstart.training.fine_tuning import (
    ActivationCache,
    Entry,
    SplitBackbone,
    TuningSettings,
    cache_activations,
    entry_key,
    fine_tune_classifier,
    selected_epoch,
)
from headstart.training.head import HEAD_DENSE, build_classifier, train_head

CUT = 14  # at 32 px: activations of 2×2×96 entering block 14, so blocks 14–17 and the last convolution train


@pytest.fixture(scope="module")
def bundled_32(tmp_path_factory):
    return resolve_backbone(BUNDLED_HANDLE, 32, tmp_path_factory.mktemp("cache"))


@pytest.fixture
def dataset(colour_folder, bundled_32, tmp_path):
    config = TrainConfig.smoke(data=str(colour_folder), cache_dir=tmp_path / "cache", validation_fraction=0.25)
    context = ExtractionContext(config.runtime.cache_dir, ExtractionSettings("keras"))
    return config, extract_dataset(source_of(config)[0], bundled_32, context)


def _entries(features, split="train", flipped=False):
    rows = features.rows(split, ["sha256", "path"])
    return [Entry(entry_key(sha, flipped), sha, path, flipped) for sha, path in zip(rows["sha256"], rows["path"])]


def _holds(cached: np.ndarray, computed) -> None:
    """The cache holds the computed activations in float16: each value the float16 of the computed
    one, give or take one float16 step and float32 round-off (computed in another batch size, the
    float32 values may differ in their last bits on some processors, and round to the next float16)."""
    computed = np.asarray(computed, np.float32)
    step = np.spacing(np.abs(computed).astype(np.float16)).astype(np.float32)
    round_off = 1e-5 * np.abs(computed).max()
    assert np.all(np.abs(cached.astype(np.float32) - computed) <= step + round_off)


def test_the_activation_cache_holds_what_the_lower_stages_compute(dataset, bundled_32):
    config, features = dataset
    split = SplitBackbone(bundled_32, CUT)
    cache = ActivationCache(config.runtime.cache_dir, bundled_32, CUT)
    entries = _entries(features) + _entries(features, flipped=True)
    first = cache_activations(split, cache, entries, batch_size=5)
    assert (first.computed, first.reused, first.left_out) == (len(entries), 0, [])
    again = cache_activations(split, cache, entries)
    assert (again.computed, again.reused) == (0, len(entries))

    images = [load_image(Path(entry.path)).astype(np.float32) / 255.0 for entry in entries]
    mirrored = [entry.flipped for entry in entries]
    cached = cache.load([entry.key for entry in entries], split.activation_shape)
    assert cached.shape == (len(entries), 2, 2, 96) and cached.dtype == np.float16
    _holds(cached, split.activations(images, mirrored))
    # A mirror is the activations of the mirrored image, not a mirror of the activations.
    half = len(entries) // 2
    assert not np.array_equal(cached[:half], cached[half:])
    _holds(cached[half:], split.activations([image[:, ::-1] for image in images[:half]], [False] * half))

    # The upper stages on the cached (half-precision) activations give the whole module's features.
    whole = bundled_32.keras_layer()(np.stack(images[:half])).numpy()
    upper = split.upper(cached[:half].astype(np.float32)).numpy()
    assert np.abs(upper - whole).max() <= 2e-3 * np.abs(whole).max()
    np.testing.assert_allclose(split.upper(split.activations(images[:half], [False] * half)).numpy(), whole, atol=1e-4)


def test_a_damaged_activation_shard_is_computed_again_and_a_dead_writers_temporary_cleared(dataset, bundled_32):
    config, features = dataset
    split, cache = SplitBackbone(bundled_32, CUT), ActivationCache(config.runtime.cache_dir, bundled_32, CUT)
    entries = _entries(features)
    cache_activations(split, cache, entries)
    [shard] = cache.shard_paths()
    shard.write_bytes(shard.read_bytes()[:-200])
    dead, live = cache.directory / ".shard-0.parquet.x1.tmp", cache.directory / ".shard-1.parquet.x2.tmp"
    for temporary in (dead, live):
        temporary.write_bytes(b"half a shard")
    os.utime(dead, (time.time() - 7200, time.time() - 7200))
    assert cache_activations(split, cache, entries).computed == len(entries)
    assert cache.load([entry.key for entry in entries], split.activation_shape).shape[0] == len(entries)
    assert not dead.exists() and live.exists()  # a temporary still being written is kept


def _fine_tuned(config, features, bundled_32, destination, epochs=3, learning_rate=1e-4):
    classifier = build_classifier(bundled_32.keras_layer(), 2, 32, 0.2, 0)
    train_head(classifier, features.stream("train"), features.stream("validation"), 3, 8, 1e-2, 3, 0)
    head = [weight.copy() for weight in classifier.get_layer(HEAD_DENSE).get_weights()]
    result = fine_tune_classifier(
        classifier,
        bundled_32,
        features,
        config.runtime.cache_dir,
        destination,
        CUT,
        TuningSettings(epochs, 8, learning_rate, epochs, seed=0),
        flip=True,
    )
    return result, head, classifier


def _module_variables(module_path: Path) -> dict[str, np.ndarray]:
    from headstart.infra.keras import tf

    return {variable.name: variable.numpy() for variable in tf.saved_model.load(str(module_path)).variables}


def test_fine_tuning_changes_only_the_stages_above_the_cut(dataset, bundled_32, tmp_path):
    config, features = dataset
    result, head_before, classifier = _fine_tuned(config, features, bundled_32, tmp_path / "tuned")
    assert result.backbone.fingerprint != bundled_32.fingerprint
    before, after = _module_variables(bundled_32.module_path), _module_variables(result.backbone.module_path)
    assert sorted(before) == sorted(after)
    upper_layers = {layer.name for layer in SplitBackbone(bundled_32, CUT).upper.layers if layer.weights}

    def stage_of(name: str) -> str:
        return name.split("/")[0]

    changed = {name for name in before if not np.array_equal(before[name], after[name])}
    unchanged_lower = [name for name in before if stage_of(name) not in upper_layers]
    assert unchanged_lower and not changed & set(unchanged_lower)  # every lower stage bit for bit the bundled one
    assert {stage_of(name) for name in changed} == upper_layers  # and every stage above the cut trained
    assert not all(np.array_equal(a, b) for a, b in zip(head_before, classifier.get_layer(HEAD_DENSE).get_weights()))
    summary = result.summary
    assert summary.from_stage == CUT and summary.epochs_run == 3 and 0 <= summary.best_epoch <= 3
    assert summary.activations.computed == 2 * len(features.rows("train", ["sha256"])["sha256"]) + len(
        features.rows("validation", ["sha256"])["sha256"]
    )
    assert len(result.history["val_accuracy"]) == 4 and len(result.history["seconds"]) == 3


def test_fine_tuning_is_deterministic_and_reuses_the_cached_activations(dataset, bundled_32, tmp_path):
    config, features = dataset
    first, _, _ = _fine_tuned(config, features, bundled_32, tmp_path / "first", epochs=2)
    second, _, _ = _fine_tuned(config, features, bundled_32, tmp_path / "second", epochs=2)
    assert (
        second.summary.activations.computed == 0
        and second.summary.activations.reused == first.summary.activations.computed
    )
    assert first.backbone.fingerprint == second.backbone.fingerprint
    assert first.history == {**second.history, "seconds": first.history["seconds"]}


def test_fine_tuning_needs_the_bundled_backbone_and_a_validation_split(
    colour_folder, tiny_backbone_dir, bundled_32, tmp_path
):
    config = TrainConfig.smoke(data=str(colour_folder), cache_dir=tmp_path / "cache", backbone=str(tiny_backbone_dir))
    tiny = resolve_backbone(config.backbone.handle, 32, config.runtime.cache_dir)
    with pytest.raises(HeadstartError, match="fine-tuning needs the bundled backbone"):
        SplitBackbone(tiny, CUT)
    with pytest.raises(ValueError, match="fine-tuning needs the bundled backbone"):
        TrainConfig.smoke(data=str(colour_folder), fine_tune=True, backbone=str(tiny_backbone_dir))
    with pytest.raises(ValueError, match="fine-tuning selects its best epoch on the validation split"):
        TrainConfig.smoke(data=str(colour_folder), fine_tune=True, validation_fraction=0.0)
    # A split that comes out empty all the same (a folder too small for one) is one line too.
    config = TrainConfig.smoke(data=str(colour_folder), cache_dir=tmp_path / "cache", validation_fraction=0.0)
    features = extract_dataset(
        source_of(config)[0], bundled_32, ExtractionContext(config.runtime.cache_dir, ExtractionSettings("keras"))
    )
    with pytest.raises(HeadstartError, match="validation split, which is empty"):
        _fine_tuned(config, features, bundled_32, tmp_path / "tuned")


def test_the_epoch_kept_is_the_latest_within_one_standard_error_of_the_best():
    # 1000 validation images: one standard error at 0.90 is 0.0095.
    assert selected_epoch([0.82, 0.85, 0.904, 0.88, 0.896, 0.89], 1000) == 4
    assert selected_epoch([0.82, 0.85, 0.904, 0.88, 0.893, 0.89], 1000) == 2
    assert selected_epoch([0.82, 0.78, 0.79], 1000) == 0  # fine-tuning did not help: the head alone
    assert selected_epoch([0.5, 0.9, 0.9], 10) == 2


def test_a_mirror_averaged_backbone_averages_the_features_of_each_image_and_its_mirror(bundled_32, tmp_path):
    from headstart.infra.keras import tf

    split = SplitBackbone(bundled_32, CUT)
    plain, averaged = (
        split.export(tmp_path / "plain", "plain"),
        split.export(tmp_path / "averaged", "averaged", mirror_average=True),
    )
    assert averaged.fingerprint != plain.fingerprint
    images = np.random.default_rng(0).random((4, 32, 32, 3), dtype=np.float32)
    mirrored = np.ascontiguousarray(images[:, :, ::-1])
    plain_features, averaged_features = (
        tf.saved_model.load(str(plain.module_path)),
        tf.saved_model.load(str(averaged.module_path)),
    )
    expected = (plain_features(images).numpy() + plain_features(mirrored).numpy()) / 2
    tolerance = 1e-5 * np.abs(expected).max()
    np.testing.assert_allclose(averaged_features(images).numpy(), expected, atol=tolerance)
    np.testing.assert_allclose(averaged_features(mirrored).numpy(), averaged_features(images).numpy(), atol=tolerance)
    assert not np.allclose(
        plain_features(images).numpy(), expected, atol=tolerance
    )  # the mirror does change the features


def test_cutmix_takes_one_rectangle_from_a_partner_and_blends_the_labels_by_its_area():
    from headstart.training.fine_tuning import _cut_and_mixed

    batch = np.arange(6, dtype=np.float32)[:, None, None, None] * np.ones((6, 8, 8, 3), np.float32)
    targets = np.eye(6, dtype=np.float32)
    for seed in range(20):
        mixed, blended = _cut_and_mixed(batch, targets, 1.0, np.random.default_rng(seed))
        for image, target, source in zip(mixed, blended, batch):
            taken = image[..., 0] != source[0, 0, 0]
            partner = np.unique(image[taken][:, 0])
            assert len(partner) <= 1  # one partner, one rectangle
            rows, columns = np.nonzero(taken)
            if len(rows):
                assert taken[rows.min() : rows.max() + 1, columns.min() : columns.max() + 1].all()
                assert target[int(partner[0])] == pytest.approx(taken.mean())
            assert target[int(source[0, 0, 0])] == pytest.approx(1 - taken.mean()) and target.sum() == pytest.approx(1)


def test_fine_tuning_settings_count_towards_the_training_key_only_where_it_runs(colour_folder):
    from headstart.registry.reuse import training_key

    base = TrainConfig(data=str(colour_folder))
    assert training_key(base, "m", "b") == training_key(base.with_options(**{"fine_tune_epochs": 3}), "m", "b")
    tuned = base.with_options(**{"fine_tune": True})
    assert training_key(tuned, "m", "b") != training_key(base, "m", "b")
    assert training_key(tuned, "m", "b") != training_key(tuned.with_options(**{"fine_tune_epochs": 3}), "m", "b")
    assert training_key(tuned, "m", "b") != training_key(tuned.with_options(**{"fine_tune_from": 14}), "m", "b")


def _fine_tune_config(folder, tmp_path, **overrides):
    values = dict(
        epochs=20,
        learning_rate=0.05,
        batch_size=8,
        patience=20,
        test_fraction=0.25,
        validation_fraction=0.2,
        near_duplicate_threshold=1.0,
        fine_tune=True,
        fine_tune_from=CUT,
        fine_tune_epochs=2,
        fine_tune_learning_rate=1e-3,
        artifacts_root=tmp_path / "artifacts",
        cache_dir=tmp_path / "cache",
        gate=False,
    )
    values.update(overrides)
    return TrainConfig.smoke(data=str(folder), **values)


def test_a_fine_tuned_run_serves_what_evaluation_measured_and_is_reused_correctly(
    prefect_harness, colour_folder, tmp_path
):
    from prefect.artifacts import Artifact

    from flows.train import train
    from headstart.registry.runs import Run
    from headstart.reporting.plots import FINE_TUNING_PLOT

    config = _fine_tune_config(colour_folder, tmp_path)
    run = Run.if_complete(Path(train(**config.flat())))
    fine_tuning = run.fine_tuning
    assert fine_tuning.from_stage == CUT and fine_tuning.epochs_run == 2
    assert run.backbone.fingerprint == run.lineage.backbone.fingerprint != fine_tuning.base_backbone.fingerprint
    assert len(run.history["fine_tuning"]["loss"]) == 2 and "Fine-tuned: stages 14–18" in run.model_card
    assert f"**Fine-tuned** from stage {CUT} in 2 epochs" in Artifact.get("headstart-report").data
    assert (run.path / "plots" / FINE_TUNING_PLOT).read_bytes().startswith(b"\x89PNG")
    assert Artifact.get("headstart-report").data.count("data:image/png;base64,") == len(run.plots())

    _serves_what_evaluation_measured(run, tmp_path)

    # The same inputs again, with the gate on: the run stands for it and is gated, scored by its own
    # serving model (its fine-tuned features are not the frozen ones this run extracted).
    # Other fine-tuning settings: trained anew, on the cached activations.
    assert Path(train(**config.with_options(**{"gate": True}).flat())) == run.path
    assert f"accuracy {run.metrics['accuracy']:.4f}" in Artifact.get("headstart-gate").description
    longer = Run(
        Path(
            train(
                **_fine_tune_config(colour_folder, tmp_path, fine_tune_epochs=3, fine_tune_mirror_average=True).flat()
            )
        )
    )
    assert "reused_from" not in longer.config and longer.fine_tuning.epochs_run == 3
    assert longer.fine_tuning.activations.computed == 0
    # Its backbone averages each image's features with its mirror's: served the same way too.
    assert longer.fine_tuning.mirror_average and "mirror image" in longer.model_card
    _serves_what_evaluation_measured(longer, tmp_path)
    retrained = Run(Path(train(**config.with_options(**{"reuse_identical_runs": False}).flat())))
    assert retrained.backbone.fingerprint == run.backbone.fingerprint  # deterministic under the seed
    assert retrained.metrics["accuracy"] == run.metrics["accuracy"]


def _serves_what_evaluation_measured(run, tmp_path):
    """The run's saved model, loaded and served from raw pixels, and `predict` give the
    probabilities evaluation measured on the fine-tuned backbone's features."""
    from headstart.evaluation.metrics import evaluate_split
    from headstart.features.dataset import FeatureSet
    from headstart.serving.predict import predict_images

    features_file = sorted((tmp_path / "cache" / "datasets").glob(f"*-{run.backbone.fingerprint}-32px-*.parquet"))
    assert len(features_file) == 1
    tuned_features = FeatureSet(features_file[0], 0, 0, "cache")
    metrics, evaluated = evaluate_split(run.keras_model(), tuned_features, "test", run.class_names)
    assert metrics["accuracy"] == run.metrics["accuracy"]
    _, test_paths = tuned_features.labels_and_paths("test")
    raw = np.stack([load_image(Path(path)) for path in test_paths]).astype(np.float32)
    np.testing.assert_allclose(run.serving_model()(raw), evaluated, atol=1e-4)
    with ExtractionContext(tmp_path / "predict-cache") as context:
        predicted = predict_images(run, [Path(path) for path in test_paths], context)
    np.testing.assert_allclose(predicted.probabilities, evaluated, atol=1e-4)
