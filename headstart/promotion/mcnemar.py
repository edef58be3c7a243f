"""The promotion gate: does a candidate replace the champion?

Both models are scored on the same images, so the comparison is paired: only the images on
which exactly one of them is right say anything about which is better. The exact one-sided
McNemar test asks whether the candidate's share of those is low enough to show it worse; the
candidate is promoted when it is not worse by accuracy (within a tolerance) and not shown worse
by the test. The first model has no champion to beat: it must beat always predicting the most
common class (or a floor the user sets).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from math import comb

import numpy as np

from headstart.training.imbalance import mean_recall

# Seeded draws of the balanced-accuracy test: the p-value's sampling error is below 0.001 near 0.05.
BALANCED_TEST_DRAWS = 200_000


@dataclass(frozen=True)
class GateDecision:
    """What the gate decided and why, with every figure it decided on."""

    promote: bool
    reason: str
    images: int
    candidate_accuracy: float
    champion_accuracy: float | None = None
    champion: str | None = None
    # Images the candidate gets wrong and the champion right, and the other way round.
    candidate_only_wrong: int | None = None
    candidate_only_right: int | None = None
    p_value: float | None = None
    tolerance: float | None = None
    alpha: float | None = None
    floor: float | None = None
    notes: list[str] = field(default_factory=list)
    # What changed in the data since the champion was trained (headstart.evaluation.drift), where there is one.
    drift: dict | None = None
    # What the accuracies above are: "balanced accuracy" where the test split's classes are imbalanced.
    measure: str = "accuracy"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, written: dict) -> "GateDecision":
        """The decision as a run's lineage holds it; figures the gate did not record yet when the
        run was written (notes, drift) read as their defaults."""
        return cls(**{item.name: written[item.name] for item in fields(cls) if item.name in written})


def mcnemar_worse_p_value(candidate_only_wrong: int, candidate_only_right: int) -> float:
    """The exact one-sided McNemar p-value for "the candidate is worse": the chance, were both
    models equally good, that of the b + c images exactly one of them gets right, the champion
    would get b or more (B ~ Binomial(b + c, 1/2), P(B ≥ b))."""
    b, c = candidate_only_wrong, candidate_only_right
    n = b + c
    if n == 0:
        return 1.0
    return sum(comb(n, k) for k in range(b, n + 1)) / 2**n


def balanced_comparison(
    candidate_correct: np.ndarray, champion_correct: np.ndarray, labels: np.ndarray
) -> tuple[float, float, float]:
    """Both models' balanced accuracy on the same images, and McNemar's question asked of it: each
    image weighs 1 / (classes × its class's count), so the candidate's balanced accuracy minus the
    champion's is the weighed sum of the images only one of them gets right (+ the candidate, −
    the champion). Were both equally good, each class's such images would split like fair coin
    flips; the p-value is the chance of a sum as low as the one seen, from seeded draws of those
    flips (with every class the same size, it is McNemar's exact test)."""
    classes, labels = np.unique(labels, return_inverse=True)
    support = np.bincount(labels).astype(np.float64)
    weights = 1.0 / (len(classes) * support)
    only_candidate = np.bincount(labels, candidate_correct & ~champion_correct, len(classes))
    only_champion = np.bincount(labels, ~candidate_correct & champion_correct, len(classes))
    candidate, champion = mean_recall(labels, candidate_correct), mean_recall(labels, champion_correct)
    discordant = (only_candidate + only_champion).astype(np.int64)
    if discordant.sum() == 0:
        return candidate, champion, 1.0
    draws = np.random.default_rng(0).binomial(discordant, 0.5, size=(BALANCED_TEST_DRAWS, len(classes)))
    differences = ((2 * draws - discordant) * weights).sum(axis=1)
    # The rounding slack keeps a tie with the observed sum a tie.
    return candidate, champion, float(np.mean(differences <= candidate - champion + 1e-12))


def against_champion(
    candidate_correct: np.ndarray,
    champion_correct: np.ndarray,
    champion: str,
    tolerance: float = 0.0,
    alpha: float = 0.05,
    labels: np.ndarray | None = None,
) -> GateDecision:
    """Paired decision on the same images: promote when accuracy ≥ champion − tolerance and the
    McNemar test does not show the candidate worse at level alpha. Given the images' `labels`
    (where the classes are imbalanced), balanced accuracy stands for accuracy in both."""
    candidate_correct, champion_correct = np.asarray(candidate_correct, bool), np.asarray(champion_correct, bool)
    images = len(candidate_correct)
    if images == 0:
        return GateDecision(
            False, f"no images both models can be scored on fairly; champion {champion} kept", 0, 0.0, champion=champion
        )
    b = int((~candidate_correct & champion_correct).sum())
    c = int((candidate_correct & ~champion_correct).sum())
    if labels is None:
        candidate_accuracy, champion_accuracy = float(candidate_correct.mean()), float(champion_correct.mean())
        p_value, measure, test = mcnemar_worse_p_value(b, c), "accuracy", "McNemar"
    else:
        candidate_accuracy, champion_accuracy, p_value = balanced_comparison(
            candidate_correct, champion_correct, np.asarray(labels, np.int64)
        )
        measure, test = "balanced accuracy", "McNemar weighed by class"
    figures = dict(
        measure=measure,
        images=images,
        candidate_accuracy=candidate_accuracy,
        champion_accuracy=champion_accuracy,
        champion=champion,
        candidate_only_wrong=b,
        candidate_only_right=c,
        p_value=p_value,
        tolerance=tolerance,
        alpha=alpha,
    )
    if candidate_accuracy < champion_accuracy - tolerance:
        reason = (
            f"kept champion {champion}: candidate {measure} {candidate_accuracy:.4f} "
            f"is below the champion's {champion_accuracy:.4f}"
            + (f" minus tolerance {tolerance}" if tolerance else "")
            + f" on {images} images"
        )
        return GateDecision(False, reason, **figures)
    if p_value < alpha:
        return GateDecision(
            False,
            f"kept champion {champion}: {test} shows the candidate worse (p = {p_value:.3g} < {alpha}; "
            f"{b} images only the champion gets right, {c} only the candidate)",
            **figures,
        )
    return GateDecision(
        True,
        f"promoted over {champion}: {measure} {candidate_accuracy:.4f} vs {champion_accuracy:.4f} "
        f"on {images} images, not shown worse ({test} p = {p_value:.3g} ≥ {alpha})",
        **figures,
    )


def first_model(
    candidate_correct: np.ndarray, labels: np.ndarray, floor: float | None = None, balanced: bool = False
) -> GateDecision:
    """With no champion yet: promote when accuracy (balanced accuracy where `balanced`) beats the
    floor (default: always predicting the test split's most common class)."""
    candidate_correct, labels = np.asarray(candidate_correct, bool), np.asarray(labels, np.int64)
    images = len(labels)
    measure = "balanced accuracy" if balanced else "accuracy"
    if not images:
        accuracy = 0.0
    else:
        accuracy = mean_recall(labels, candidate_correct) if balanced else float(candidate_correct.mean())
    if floor is None:
        # Always predicting one class: right on that class alone.
        present = int((np.bincount(labels) > 0).sum()) if images else 1
        floor = (1.0 / present if balanced else float(np.bincount(labels).max() / images)) if images else 1.0
        what = "always predicting the most common class"
    else:
        what = "the configured floor"
    if accuracy > floor:
        return GateDecision(
            True,
            f"first model promoted: {measure} {accuracy:.4f} beats {what} ({floor:.4f}) on {images} images",
            images,
            accuracy,
            floor=floor,
            measure=measure,
        )
    hint = (
        " (every test image is of one class, so no model can; a larger test split would tell)" if floor >= 1.0 else ""
    )
    return GateDecision(
        False,
        f"first model not promoted: {measure} {accuracy:.4f} does not beat {what} ({floor:.4f}) "
        f"on {images} images{hint}; "
        "promote it by hand (`headstart models promote VERSION`) if that is meant",
        images,
        accuracy,
        floor=floor,
        measure=measure,
    )


def different_classes(
    candidate: list[str], champion: list[str], champion_version: str, candidate_accuracy: float, images: int
) -> GateDecision:
    """A candidate for other classes than the champion's is never promoted automatically."""
    return GateDecision(
        False,
        f"kept champion {champion_version}: the candidate's classes ({', '.join(candidate)}) "
        f"differ from the champion's ({', '.join(champion)}); promote it by hand if that is meant",
        images,
        candidate_accuracy,
        champion=champion_version,
    )
