"""The promotion gate on constructed predictions: exact McNemar p-values, tolerance, first model, classes."""

import numpy as np
import pytest

from headstart.promotion import mcnemar as gate


@pytest.mark.parametrize(
    "b, c, expected",
    [
        (0, 0, 1.0),
        (5, 0, 1 / 32),  # P(B ≥ 5), B ~ Bin(5, 1/2): only 5 of 5
        (0, 5, 1.0),  # P(B ≥ 0)
        (3, 1, (4 + 1) / 16),  # C(4,3) + C(4,4) over 2^4
        (7, 3, (120 + 45 + 10 + 1) / 1024),  # C(10,7..10) over 2^10 = 0.171875
        (9, 1, (10 + 1) / 1024),
    ],
)
def test_exact_one_sided_mcnemar_against_the_hand_computed_binomial(b, c, expected):
    assert gate.mcnemar_worse_p_value(b, c) == pytest.approx(expected, rel=1e-12)


def _paired(both_right: int, only_champion: int, only_candidate: int, both_wrong: int):
    candidate = [True] * both_right + [False] * only_champion + [True] * only_candidate + [False] * both_wrong
    champion = [True] * both_right + [True] * only_champion + [False] * only_candidate + [False] * both_wrong
    return np.array(candidate), np.array(champion)


def test_a_candidate_shown_worse_is_not_promoted_even_within_tolerance():
    candidate, champion = _paired(80, 12, 2, 6)  # 0.82 vs 0.92; p = P(B ≥ 12 | 14) = 106 / 16384
    decision = gate.against_champion(candidate, champion, "v1", tolerance=0.2)
    assert not decision.promote
    assert (decision.candidate_only_wrong, decision.candidate_only_right) == (12, 2)
    assert decision.p_value == pytest.approx((91 + 14 + 1) / 2**14)
    assert "McNemar" in decision.reason and "v1" in decision.reason


def test_lower_accuracy_beyond_tolerance_keeps_the_champion():
    candidate, champion = _paired(80, 4, 3, 13)  # 0.83 vs 0.84, p = P(B ≥ 4 | 7) = 0.5
    assert not gate.against_champion(candidate, champion, "v1").promote
    decision = gate.against_champion(candidate, champion, "v1", tolerance=0.02)
    assert decision.promote and decision.p_value == pytest.approx(64 / 128)


def test_an_equal_or_better_candidate_is_promoted():
    candidate, champion = _paired(80, 3, 5, 12)
    decision = gate.against_champion(candidate, champion, "v1")
    assert decision.promote and decision.candidate_accuracy == 0.85 and decision.champion_accuracy == 0.83
    assert gate.against_champion(*_paired(50, 0, 0, 50), "v1").promote  # identical predictions: not worse


def test_the_first_model_must_beat_the_most_common_class_or_the_floor():
    labels = np.array([0] * 70 + [1] * 30)
    assert not gate.first_model(np.arange(100) < 70, labels).promote  # 0.70: what always saying "0" gets
    decision = gate.first_model(np.arange(100) < 71, labels)
    assert decision.promote and decision.floor == 0.7
    assert not gate.first_model(np.arange(100) < 71, labels, floor=0.9).promote


def test_a_first_model_on_a_one_class_test_split_is_not_promoted_and_the_reason_says_why():
    decision = gate.first_model(np.ones(2, bool), np.zeros(2, int))
    assert (
        not decision.promote
        and "every test image is of one class" in decision.reason
        and "headstart models promote" in decision.reason
    )


def test_a_candidate_for_other_classes_is_never_promoted_automatically():
    decision = gate.different_classes(["cat", "dog"], ["cat", "fox"], "v1", 0.99, 100)
    assert not decision.promote and "differ" in decision.reason
