"""The classifier: a frozen backbone, a trainable head, trained on features ≡ trained on images."""

import numpy as np
import pytest
from configs import source_of
from conftest import extract_dataset

from headstart.backbone.handles import resolve_backbone
from headstart.config import TrainConfig
from headstart.features.extraction import ExtractionContext, ExtractionSettings
from headstart.training.head import build_classifier, predict_from_features, train_head


def _features(config, backbone, cache_dir, **assemble_options):
    context = ExtractionContext(cache_dir, ExtractionSettings("keras"))
    return extract_dataset(source_of(config)[0], backbone, context, **assemble_options)


@pytest.fixture
def setup(colour_folder, tiny_backbone_dir, tmp_path):
    config = TrainConfig.smoke(data=str(colour_folder), cache_dir=tmp_path / "cache", backbone=str(tiny_backbone_dir))
    backbone = resolve_backbone(config.backbone.handle, 32, config.runtime.cache_dir)
    return config, backbone, _features(config, backbone, config.runtime.cache_dir)


def _classifier(backbone, seed=0):
    return build_classifier(backbone.keras_layer(), 2, 32, dropout=0.2, seed=seed)


def test_only_the_head_is_trainable(setup):
    _, backbone, _ = setup
    classifier = _classifier(backbone)
    assert [w.name.split("/")[0] for w in classifier.trainable_weights] == ["head_dense", "head_dense"]
    assert len(classifier.non_trainable_weights) == len(backbone.keras_layer().weights) > 0


def test_head_on_features_equals_classifier_on_raw_images(setup):
    config, backbone, features = setup
    classifier = _classifier(backbone)
    train_head(classifier, features.load("train")[:2], features.load("validation")[:2], 3, 16, 1e-2, 3, 0)
    cached, _, paths = features.load()
    from headstart.data.images import load_image

    raw = np.stack([load_image(p) for p in paths]).astype(np.float32)
    np.testing.assert_allclose(classifier.predict(raw, verbose=0), predict_from_features(classifier, cached), atol=1e-5)


def test_training_learns_and_is_deterministic(setup):
    _, backbone, features = setup
    results = []
    for _ in range(2):
        classifier = _classifier(backbone)
        history = train_head(classifier, features.load("train")[:2], None, 15, 8, 3e-2, 3, seed=5)
        test_features, labels, _ = features.load()
        probabilities = predict_from_features(classifier, test_features)
        results.append((history["loss"], probabilities))
    assert results[0][0] == results[1][0]
    np.testing.assert_array_equal(results[0][1], results[1][1])
    assert results[0][0][-1] < results[0][0][0]
    assert (results[0][1].argmax(1) == labels).mean() >= 0.9


def test_early_stopping_keeps_the_best_epoch(setup):
    _, backbone, features = setup
    train_features, train_labels, _ = features.load("train")
    contrary = (train_features, 1 - train_labels)  # validation that only gets worse as training improves
    classifier = _classifier(backbone)
    history = train_head(classifier, (train_features, train_labels), contrary, 20, 8, 3e-2, 2, seed=1)
    best = int(np.argmin(history["val_loss"]))
    assert len(history["val_loss"]) == best + 3 < 20
    probabilities = predict_from_features(classifier, train_features)
    restored_loss = -np.mean(np.log(probabilities[np.arange(len(train_labels)), 1 - train_labels]))
    assert abs(restored_loss - history["val_loss"][best]) < 1e-4


def test_whole_batches_carry_the_remainder_across_chunks():
    from headstart.training.head import _whole_batches

    chunks = [
        (np.arange(n, dtype=np.float32)[:, None] + offset, np.arange(n) + offset)
        for n, offset in ((5, 0), (7, 5), (2, 12))
    ]
    sizes = [len(labels) for _, labels in _whole_batches(iter(chunks), 4)]
    assert sizes == [4, 8, 2]
    assert np.concatenate([labels for _, labels in _whole_batches(iter(chunks), 4)]).tolist() == list(range(14))
