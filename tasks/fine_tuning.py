"""The Prefect task around headstart.training.fine_tuning: fine_tune, after train_head."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from headstart.backbone.handles import Backbone
from headstart.config import FineTuningConfig, HeadConfig
from headstart.features.dataset import FeatureSet
from headstart.training.fine_tuning import FineTuningResult, TuningSettings, activation_entries, fine_tune_classifier
from tasks.progress import DashboardProgress


@task(name="fine_tune", cache_policy=NO_CACHE)
def fine_tune(
    settings: FineTuningConfig,
    head: HeadConfig,
    cache_dir: Path,
    training_key: str,
    backbone: Backbone,
    classifier,
    features: FeatureSet,
) -> FineTuningResult:
    """Fine-tunes the backbone's stages from --fine-tune-from up with the head, on activations
    cached below them; returns the fine-tuned backbone, written as a TF Hub module into the cache
    under the run's training key (see headstart.training.fine_tuning). Its batch size and seed are
    the head's."""
    destination = Path(cache_dir) / "backbones" / f"fine-tuned-{training_key}"
    with (
        DashboardProgress(
            activation_entries(features, settings.flip),
            f"fine-tune: activations into stage {settings.from_stage}",
        ) as activations,
        DashboardProgress(settings.epochs, f"fine-tune: at most {settings.epochs} epochs", unit="epoch") as epochs,
    ):

        def epoch_done(epoch: int, history: dict[str, list[float]]) -> None:
            scores = ", ".join(
                f"{name} {history[name][-1]:.4f}" for name in ("loss", "accuracy", "val_loss", "val_accuracy")
            )
            epochs.update(
                1,
                f"fine-tune: epoch {epoch} of at most {settings.epochs} ({history['seconds'][-1]:.0f} s); {scores}",
            )
            # An epoch takes a while: a line for each in the flow run's log, as well as the progress bar.
            get_run_logger().info(
                "fine-tune epoch %d of at most %d: %.0f s; %s",
                epoch,
                settings.epochs,
                history["seconds"][-1],
                scores,
            )

        result = fine_tune_classifier(
            classifier,
            backbone,
            features,
            cache_dir,
            destination,
            settings.from_stage,
            TuningSettings.from_config(settings, head),
            settings.flip,
            settings.mirror_average,
            activations,
            epoch_done,
        )
        epochs.finish(f"fine-tune: {result.outcome()}")
    return result
