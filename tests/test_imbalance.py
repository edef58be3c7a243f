"""Imbalanced classes: class weights in the head's loss, balanced accuracy, and a gate that
compares balanced accuracy where the test split is imbalanced."""

import numpy as np
import pytest

from headstart.evaluation.metrics import classification_metrics
from headstart.promotion.mcnemar import against_champion, balanced_comparison, first_model, mcnemar_worse_p_value
from headstart.training.imbalance import class_weights


def test_class_weights_turn_on_at_the_documented_ratio_or_on_request():
    balanced_enough = np.array([0] * 20 + [1] * 59)  # 2.95 : 1
    assert class_weights("auto", balanced_enough, 2) is None
    imbalanced = np.array([0] * 10 + [1] * 100)
    weights = class_weights("auto", imbalanced, 2)
    assert weights == pytest.approx([110 / 20, 110 / 200])
    # Weighed, each class adds up to the same total.
    assert 10 * weights[0] == pytest.approx(100 * weights[1])
    assert class_weights("none", imbalanced, 2) is None
    assert class_weights("balanced", balanced_enough, 3) == pytest.approx([79 / 40, 79 / 118, 0])


def _imbalanced_features(seed: int, minority: int, majority: int):
    generator = np.random.default_rng(seed)
    labels = np.array([0] * minority + [1] * majority)
    features = generator.normal(size=(len(labels), 8)).astype(np.float32)
    features[:, 0] += np.where(labels == 0, -0.8, 0.8)  # overlapping classes: where to cut is a choice
    return features, labels


def test_class_weights_raise_the_minority_class_recall():
    from headstart.training.head import predict_from_features, rebuilt_head, train_head

    train = _imbalanced_features(0, 60, 600)
    validation = _imbalanced_features(1, 30, 300)
    test = _imbalanced_features(2, 200, 2000)
    recalls = {}
    for name, weights in (("plain", None), ("weighed", class_weights("auto", train[1], 2))):
        head = rebuilt_head(np.zeros((8, 2), np.float32), np.zeros(2, np.float32))
        train_head(head, train, validation, 60, 32, 0.01, 60, seed=0, class_weights=weights)
        metrics = classification_metrics(test[1], predict_from_features(head, test[0]), ["cat", "dog"])
        recalls[name] = (metrics["per_class"]["cat"]["recall"], metrics["balanced_accuracy"], metrics["accuracy"])
    assert recalls["weighed"][0] > recalls["plain"][0] + 0.2
    assert recalls["weighed"][1] > recalls["plain"][1]
    assert recalls["weighed"][2] < recalls["plain"][2]  # the price: the majority class loses some


def test_balanced_accuracy_is_the_mean_recall():
    labels = np.array([0] * 10 + [1] * 90)
    always_dog = np.tile([[0.1, 0.9]], (100, 1))
    metrics = classification_metrics(labels, always_dog, ["cat", "dog"])
    assert metrics["accuracy"] == pytest.approx(0.9) and metrics["balanced_accuracy"] == pytest.approx(0.5)


def test_with_equal_classes_the_weighed_test_is_mcnemars():
    generator = np.random.default_rng(4)
    labels = np.repeat([0, 1, 2], 100)
    candidate = generator.uniform(size=300) < 0.8
    champion = generator.uniform(size=300) < 0.86
    b, c = int((~candidate & champion).sum()), int((candidate & ~champion).sum())
    assert balanced_comparison(candidate, champion, labels)[2] == pytest.approx(mcnemar_worse_p_value(b, c), abs=0.005)


def test_the_gate_judges_an_imbalanced_split_by_balanced_accuracy():
    """A candidate that gets 12 more minority images right and 20 more majority images wrong is
    worse by accuracy but much better by balanced accuracy: the gate promotes it on an imbalanced split."""
    labels = np.array([0] * 40 + [1] * 400)
    champion = np.ones(440, bool)
    champion[:20] = False  # half the minority wrong
    candidate = champion.copy()
    candidate[:12] = True
    candidate[40:60] = False
    plain = against_champion(candidate, champion, "v1", alpha=0.05)
    weighed = against_champion(candidate, champion, "v1", alpha=0.05, labels=labels)
    assert not plain.promote and plain.measure == "accuracy"
    assert weighed.promote and weighed.measure == "balanced accuracy" and "balanced accuracy" in weighed.reason
    assert weighed.candidate_accuracy == pytest.approx((32 / 40 + 380 / 400) / 2)
    # And the other way round: it keeps a champion the candidate is worse than on the minority class.
    assert not against_champion(champion, candidate, "v2", labels=labels).promote


def test_a_first_model_on_an_imbalanced_split_must_beat_one_class_in_balanced_accuracy():
    labels = np.array([0] * 10 + [1] * 90)
    always_dog = labels == 1
    assert not first_model(always_dog, labels, balanced=True).promote
    somewhat = always_dog.copy()
    somewhat[:4] = True
    decision = first_model(somewhat, labels, balanced=True)
    assert decision.promote and decision.floor == 0.5 and decision.candidate_accuracy == pytest.approx(0.7)
