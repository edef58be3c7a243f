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


def against_champion(
    candidate_correct: np.ndarray,
    champion_correct: np.ndarray,
    champion: str,
    tolerance: float = 0.0,
    alpha: float = 0.05,
) -> GateDecision:
    """Paired decision on the same images: promote when accuracy ≥ champion − tolerance and the
    McNemar test does not show the candidate worse at level alpha."""
    candidate_correct, champion_correct = np.asarray(candidate_correct, bool), np.asarray(champion_correct, bool)
    images = len(candidate_correct)
    if images == 0:
        return GateDecision(
            False, f"no images both models can be scored on fairly; champion {champion} kept", 0, 0.0, champion=champion
        )
    candidate_accuracy, champion_accuracy = float(candidate_correct.mean()), float(champion_correct.mean())
    b = int((~candidate_correct & champion_correct).sum())
    c = int((candidate_correct & ~champion_correct).sum())
    p_value = mcnemar_worse_p_value(b, c)
    figures = dict(
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
            f"kept champion {champion}: candidate accuracy {candidate_accuracy:.4f} "
            f"is below the champion's {champion_accuracy:.4f}"
            + (f" minus tolerance {tolerance}" if tolerance else "")
            + f" on {images} images"
        )
        return GateDecision(False, reason, **figures)
    if p_value < alpha:
        return GateDecision(
            False,
            f"kept champion {champion}: McNemar shows the candidate worse (p = {p_value:.3g} < {alpha}; "
            f"{b} images only the champion gets right, {c} only the candidate)",
            **figures,
        )
    return GateDecision(
        True,
        f"promoted over {champion}: accuracy {candidate_accuracy:.4f} vs {champion_accuracy:.4f} on {images} images, "
        f"not shown worse (McNemar p = {p_value:.3g} ≥ {alpha})",
        **figures,
    )


def first_model(candidate_correct: np.ndarray, labels: np.ndarray, floor: float | None = None) -> GateDecision:
    """With no champion yet: promote when accuracy beats the floor (default: always predicting
    the test split's most common class)."""
    candidate_correct, labels = np.asarray(candidate_correct, bool), np.asarray(labels)
    images = len(labels)
    accuracy = float(candidate_correct.mean()) if images else 0.0
    if floor is None:
        floor = float(np.bincount(labels).max() / images) if images else 1.0
        what = "always predicting the most common class"
    else:
        what = "the configured floor"
    if accuracy > floor:
        return GateDecision(
            True,
            f"first model promoted: accuracy {accuracy:.4f} beats {what} ({floor:.4f}) on {images} images",
            images,
            accuracy,
            floor=floor,
        )
    hint = (
        " (every test image is of one class, so no model can; a larger test split would tell)" if floor >= 1.0 else ""
    )
    return GateDecision(
        False,
        f"first model not promoted: accuracy {accuracy:.4f} does not beat {what} ({floor:.4f}) "
        f"on {images} images{hint}; "
        "promote it by hand (`headstart models promote VERSION`) if that is meant",
        images,
        accuracy,
        floor=floor,
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
