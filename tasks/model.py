"""Prefect tasks around headstart.training.head: build_model and train_head."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from headstart.backbone.handles import Backbone
from headstart.config import HeadConfig
from headstart.features.dataset import FeatureSet
from tasks.progress import DashboardProgress


@task(name="build_model", cache_policy=NO_CACHE)
def build_model(head: HeadConfig, backbone: Backbone, class_names: tuple[str, ...], head_from=None):
    """The end-to-end Functional model: images → frozen backbone → Dropout → Dense; the head's
    weights those of `head_from` (a classifier trained before) where given."""
    from headstart.training.head import HEAD_DENSE, build_classifier

    classifier = build_classifier(
        backbone.keras_layer(), len(class_names), backbone.image_size, head.dropout, head.seed
    )
    if head_from is not None:
        classifier.get_layer(HEAD_DENSE).set_weights(head_from.get_layer(HEAD_DENSE).get_weights())
    return classifier


@task(name="train_head", cache_policy=NO_CACHE)
def train_head(
    settings: HeadConfig, classifier, features: FeatureSet, leave_out: frozenset[str] = frozenset()
) -> dict[str, list[float]]:
    """Fits the classifier's head on the cached features of the train split, as the settings say
    (headstart.training.fitting.fit_configured_head), without the images whose content hashes are in
    `leave_out`."""
    from headstart.training.fitting import fit_configured_head

    adam = settings.solver == "adam"
    epochs = settings.epochs if adam else 1
    with DashboardProgress(epochs, f"train head: at most {epochs} epochs", unit="epoch") as progress:

        def epoch_done(epoch: int, history: dict[str, list[float]]) -> None:
            scores = ", ".join(f"{name} {values[-1]:.4f}" for name, values in history.items())
            progress.update(1, f"train head: epoch {epoch + 1} of at most {epochs}; {scores}")

        history = fit_configured_head(settings, classifier, features, on_epoch=epoch_done, leave_out=leave_out)
        stalled = adam and len(history["loss"]) < epochs
        progress.finish(
            (f"train head: {len(history['loss'])} epochs" if adam else "train head: L-BFGS logistic regression")
            + (f" (stopped early: validation loss stalled for {settings.patience})" if stalled else "")
        )
    if "class_weights" in history:
        get_run_logger().info(
            "Classes weighed in the loss: %s", ", ".join(f"{w:.3f}" for w in history["class_weights"])
        )
    return history
