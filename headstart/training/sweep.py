"""A sweep of the head: a grid of settings, each trained on the cached features (seconds each,
the backbone never runs), the best kept by its validation score.

The grid is learning rate × dropout × weight decay for the Adam head, and the L-BFGS logistic
regression (headstart.training.logistic) as a baseline. Each setting is scored on the validation
split by accuracy (balanced accuracy where the classes are imbalanced, as the gate judges them),
ties broken by the lower validation loss; the train flow then trains the head with the winner's
settings, so the run is the same as one asked for with those settings.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from headstart.config import HeadConfig
from headstart.features.dataset import FeatureSet
from headstart.training.imbalance import balanced_accuracy, is_imbalanced
from headstart.training.logistic import cross_entropy

LEARNING_RATES = (3e-4, 1e-3, 3e-3)
DROPOUTS = (0.0, 0.2, 0.5)
WEIGHT_DECAYS = (0.0, 1e-2)


@dataclass(frozen=True)
class HeadSetting:
    """One point of the grid: the HeadConfig options it sets."""

    solver: str
    learning_rate: float
    dropout: float
    weight_decay: float

    def options(self) -> dict:
        return asdict(self)

    @property
    def label(self) -> str:
        if self.solver == "lbfgs":
            return "L-BFGS logistic regression"
        return f"Adam lr {self.learning_rate:g}, dropout {self.dropout:g}, weight decay {self.weight_decay:g}"


@dataclass(frozen=True)
class TriedSetting:
    """A setting as trained and scored on the validation split."""

    setting: HeadSetting
    validation_score: float
    validation_accuracy: float
    validation_loss: float
    epochs: int
    seconds: float

    def row(self) -> dict:
        return {
            "setting": self.setting.label,
            **self.setting.options(),
            "validation_score": round(self.validation_score, 4),
            "validation_accuracy": round(self.validation_accuracy, 4),
            "validation_loss": round(self.validation_loss, 4),
            "epochs": self.epochs,
            "seconds": round(self.seconds, 1),
        }


def head_settings(head: HeadConfig) -> list[HeadSetting]:
    """The grid, the baseline last; the head's own settings are among them where on the grid."""
    grid = [
        HeadSetting("adam", learning_rate, dropout, weight_decay)
        for learning_rate in LEARNING_RATES
        for dropout in DROPOUTS
        for weight_decay in WEIGHT_DECAYS
    ]
    return [*grid, HeadSetting("lbfgs", head.learning_rate, head.dropout, 0.0)]


def try_setting(setting: HeadSetting, head: HeadConfig, features: FeatureSet, num_classes: int) -> TriedSetting:
    """Trains a new head with the setting (the rest as `head` says) and scores it on validation."""
    from headstart.training.fitting import fit_configured_head
    from headstart.training.head import head_logits, new_head
    from headstart.training.logistic import in_memory

    started = time.perf_counter()
    validation_features, labels = in_memory(features.stream("validation"))
    model = new_head(validation_features.shape[1], num_classes, setting.dropout, head.seed)
    history = fit_configured_head(head.model_copy(update=setting.options()), model, features)
    logits = head_logits(model, validation_features)
    predictions = logits.argmax(axis=1)
    accuracy = float((predictions == labels).mean())
    value = balanced_accuracy(labels, predictions, num_classes) if is_imbalanced(labels, num_classes) else accuracy
    return TriedSetting(
        setting, value, accuracy, cross_entropy(logits, labels), len(history["loss"]), time.perf_counter() - started
    )


def best_setting(tried: list[TriedSetting]) -> TriedSetting:
    """The highest validation score, then the lowest validation loss, then the earlier in the grid."""
    return min(tried, key=lambda t: (-round(t.validation_score, 10), t.validation_loss))
