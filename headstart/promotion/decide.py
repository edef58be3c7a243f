"""Scoring a candidate against the current champion on the same images, and the gate's decision.

The images are the candidate's test split, less any the champion may have trained on: where
both runs split their images with the same settings, content-hash splits put every one of them
in the champion's test split too; where the settings differ, only the images the champion's own
settings put in its test split count. The champion scores them from the candidate's cached
features where both share the backbone and image size (its head alone runs), otherwise with its
serving model on the raw images.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from headstart.backbone.handles import Backbone
from headstart.config import TrainConfig
from headstart.data.manifest import assign_split
from headstart.errors import HeadstartError
from headstart.evaluation import drift
from headstart.features.dataset import FeatureSet
from headstart.promotion import mcnemar as gate
from headstart.registry import versions as registry
from headstart.registry.runs import Run


def decide(
    config: TrainConfig, backbone: Backbone, features: FeatureSet, probabilities: np.ndarray, class_names: list[str]
) -> gate.GateDecision:
    """The gate's decision for a candidate whose test-split probabilities (in the features file's row order) are given."""
    test = features.rows("test", ["sha256", "label", "path"])
    labels = np.asarray(test["label"], np.int64)
    candidate_correct = probabilities.argmax(axis=1) == labels
    champion = registry.champion(config.artifacts_root)
    if champion is None:
        return gate.first_model(candidate_correct, labels, config.gate_floor)
    changes = drift.compare(
        champion.path.name,
        champion.data_index(),
        champion.lineage.get("feature_reference"),
        drift.data_index(features, class_names),
        features,
        backbone,
    )
    if champion.class_names != list(class_names):
        decision = gate.different_classes(
            list(class_names), champion.class_names, champion.path.name, float(candidate_correct.mean()), len(labels)
        )
        return replace(decision, drift=changes)
    fair, note = _images_the_champion_never_trained_on(config, champion, test["sha256"])
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
        config.gate_tolerance,
        config.gate_alpha,
    )
    return replace(decision, notes=notes, drift=changes)


def decide_for_identical_run(
    config: TrainConfig, run: Run, backbone: Backbone, features: FeatureSet, class_names: list[str]
) -> gate.GateDecision:
    """The gate's decision for an earlier run that stands in for a new one with identical inputs:
    nothing to decide where it is the champion already; otherwise it is scored on the test split
    and judged as any new model would be (it may never have met the gate: gate settings do not
    change what a run trains)."""
    if registry.champion_version(config.artifacts_root) == run.path.name:
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
            f"{int((~scored).sum())} test images changed while this run read them; run it again to score {run.path.name} on what is there now"
        )
    return decide(config, backbone, features, probabilities, class_names)


def _images_the_champion_never_trained_on(
    config: TrainConfig, champion: Run, hashes: list[str]
) -> tuple[np.ndarray, str]:
    """Which test images the champion cannot have trained on, and a note saying how that was decided."""
    settings = champion.config
    if settings.get("data") == "cifar10":
        if config.data == "cifar10":
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
        f"{int(fair.sum())} of {len(hashes)} test images: those the champion's split settings put in its own test split",
    )


def run_probabilities(
    run: Run,
    backbone: Backbone,
    features: FeatureSet,
    fair: np.ndarray,
    paths: list[str],
    hashes: list[str],
) -> tuple[np.ndarray, np.ndarray]:
    """A run's (the champion's, say) probabilities on the test images marked `fair` (of all the test
    split's `paths` and content `hashes`), and which images they are: its head on the candidate's
    cached features where it saw the same features, else its serving model on the raw images, less
    any whose file no longer holds the content the candidate was scored on."""
    if not fair.any():
        return np.zeros((0, len(run.class_names)), np.float32), fair
    same_features = (
        run.config.get("backbone_fingerprint") == backbone.fingerprint and run.image_size == backbone.image_size
    )
    if same_features:
        from headstart.training.head import predict_from_features

        return predict_from_features(run.keras_model(), features.load("test")[0][fair]), fair
    from headstart.serving.inference import predict_files

    positions = np.flatnonzero(fair)
    probabilities, kept, _ = predict_files(
        run, [Path(paths[i]) for i in positions], expected_hashes=[hashes[i] for i in positions]
    )
    scored = np.zeros_like(fair)
    scored[positions[kept]] = True
    return probabilities, scored
