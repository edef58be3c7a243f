"""Scoring a candidate against the current champion on the same images, and the gate's decision.

The images are the candidate's test split, less any the champion may have trained on: where
both runs split their images with the same settings, content-hash splits put every one of them
in the champion's test split too; where the settings differ, only the images the champion's own
settings put in its test split count. The champion scores them from the candidate's cached
features where both share the backbone and image size (its head alone runs), otherwise with its
classifier, rebuilt from its backbone module and head weights, on the raw images.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from headstart.backbone.handles import Backbone
from headstart.config import GateConfig
from headstart.data.manifest import assign_split
from headstart.errors import HeadstartError, first_line
from headstart.evaluation import drift
from headstart.features.dataset import FeatureSet
from headstart.promotion import mcnemar as gate
from headstart.registry import versions
from headstart.registry.runs import Run
from headstart.serving.inference import run_probabilities
from headstart.training.imbalance import is_imbalanced


def scorable_champion(artifacts_root: Path) -> Run | None:
    """The registry's champion, its head read (nothing in its model file is run), so that a
    champion the gate could not score stops a train before any work rather than after training;
    None before any promotion."""
    champion = versions.champion(artifacts_root)
    if champion is not None:
        try:
            champion.head_weights()
        except HeadstartError as error:
            raise HeadstartError(
                f"the gate cannot score the champion: {first_line(error)} (or train with --no-gate)"
            ) from None
    return champion


def decide(
    settings: GateConfig,
    champion: Run | None,
    source: str,
    backbone: Backbone,
    features: FeatureSet,
    probabilities: np.ndarray,
    class_names: list[str],
) -> gate.GateDecision:
    """The gate's decision for a candidate trained on `source` whose test-split probabilities (in the
    features file's row order) are given, against `champion` (None: there is none yet)."""
    test = features.rows("test", ["sha256", "label", "path"])
    labels = np.asarray(test["label"], np.int64)
    candidate_correct = probabilities.argmax(axis=1) == labels
    balanced = is_imbalanced(labels, len(class_names))
    if champion is None:
        return gate.first_model(candidate_correct, labels, settings.floor, balanced)
    changes = drift.compare(
        champion.path.name,
        champion.data_index(),
        champion.lineage.feature_reference if champion.lineage is not None else None,
        drift.data_index(features, class_names),
        features,
        backbone,
    )
    if champion.class_names != list(class_names):
        decision = gate.different_classes(
            list(class_names), champion.class_names, champion.path.name, float(candidate_correct.mean()), len(labels)
        )
        return replace(decision, drift=changes)
    fair, note = _images_the_champion_never_trained_on(source, champion, test["sha256"])
    champion_scores, scored = run_probabilities(champion, backbone, features, fair, test["path"], test["sha256"])
    notes = [note]
    if scored.sum() < fair.sum():
        notes.append(
            f"{int(fair.sum() - scored.sum())} of those left out: their files changed or went since the run read them"
        )
    decision = gate.against_champion(
        candidate_correct[scored],
        champion_scores.argmax(axis=1) == labels[scored],
        champion.path.name,
        settings.tolerance,
        settings.alpha,
        labels[scored] if balanced else None,
    )
    return replace(decision, notes=notes, drift=changes)


def decide_for_identical_run(
    settings: GateConfig,
    champion: Run | None,
    source: str,
    run: Run,
    backbone: Backbone,
    features: FeatureSet,
    class_names: list[str],
) -> gate.GateDecision:
    """The gate's decision for an earlier run that stands in for a new one with identical inputs:
    nothing to decide where it is the champion already; otherwise it is scored on the test split
    and judged as any new model would be (it may never have met the gate: gate settings do not
    change what a run trains)."""
    if champion is not None and champion.path.name == run.path.name:
        return gate.GateDecision(
            False,
            f"{run.path.name}, whose inputs this run repeats, is the champion already: nothing to change",
            run.metrics["n"],
            run.metrics["accuracy"],
            champion=run.path.name,
        )
    test = features.rows("test", ["path", "sha256"])
    probabilities, scored = run_probabilities(
        run, backbone, features, np.ones(len(test["sha256"]), bool), test["path"], test["sha256"]
    )
    if not scored.all():
        raise HeadstartError(
            f"{int((~scored).sum())} test images changed while this run read them; "
            f"run it again to score {run.path.name} on what is there now"
        )
    return decide(settings, champion, source, backbone, features, probabilities, class_names)


def _images_the_champion_never_trained_on(source: str, champion: Run, hashes: list[str]) -> tuple[np.ndarray, str]:
    """Which test images (by content hash) of a candidate trained on `source` the champion cannot have
    trained on, and a note saying how that was decided."""
    settings = champion.config
    if settings.get("data") == "cifar10":
        if source == "cifar10":
            return np.ones(
                len(hashes), bool
            ), f"all {len(hashes)} test images: both runs hold out CIFAR-10's official test set"
        return np.zeros(
            len(hashes), bool
        ), "the champion trained on CIFAR-10 and this run on a folder: no test image is known to be unseen by it"
    # Content-hash splits: the champion's settings alone say where it put each image it had.
    fair = np.array(
        [assign_split(sha, settings["validation_fraction"], settings["test_fraction"]) == "test" for sha in hashes],
        bool,
    )
    if fair.all():
        return fair, f"all {len(hashes)} test images: the champion's split settings hold them out too"
    return (
        fair,
        f"{int(fair.sum())} of {len(hashes)} test images: "
        "those the champion's split settings put in its own test split",
    )


def promote_as_decided(artifacts_root: Path, version: str, decision: gate.GateDecision) -> gate.GateDecision:
    """Carries out a decision to promote `version`: the switch is made only if the champion is still
    the one the gate compared it with (the registry's compare-and-swap). Where the champion changed
    in between (a promotion by hand, another run's gate), the candidate is left unpromoted: it was
    never compared with the new champion. Returns the decision as it stands after the attempt."""
    if not decision.promote:
        return decision
    try:
        versions.promote(artifacts_root, version, decision.reason, by="gate", expected_champion=decision.champion)
    except versions.ChampionChanged as changed:
        compared = f"champion {changed.expected}" if changed.expected is not None else "no champion"
        return replace(
            decision,
            promote=False,
            reason=(
                f"not promoted: the gate compared it with {compared}, but {changed.current or 'no version'} "
                f"became champion before the switch; run train again to compare it with {changed.current}, "
                f"or promote it by hand (`headstart models promote {version}`)"
            ),
            notes=[*decision.notes, f"the gate had decided: {decision.reason}"],
        )
    return decision
