"""The sweep of the head: the L-BFGS logistic regression baseline, the choice on validation, and
the train flow with --sweep (mapped tasks, the chosen settings in the run's config and lineage)."""

import json

import numpy as np

from headstart.training.sweep import TriedSetting, best_setting, head_settings


def test_the_logistic_regression_is_at_its_optimum():
    """Where L-BFGS stops, the gradient of the penalised loss is zero: it is the logistic
    regression, not an approximation of it."""
    from headstart.training.head import rebuilt_head
    from headstart.training.logistic import fit_logistic_regression

    generator = np.random.default_rng(0)
    labels = generator.integers(3, size=300)
    features = generator.normal(size=(300, 6)) + np.eye(3, 6)[labels] * 1.5
    head = rebuilt_head(np.zeros((6, 3), np.float32), np.zeros(3, np.float32))
    history = fit_logistic_regression(head, (features, labels), (features[:50], labels[:50]))
    kernel, bias = (value.astype(np.float64) for value in head.get_layer("head_dense").get_weights())
    logits = features @ kernel + bias
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    error = probabilities - np.eye(3)[labels]
    assert np.abs(features.T @ error + kernel).max() < 1e-2 and np.abs(error.sum(axis=0)).max() < 1e-2
    assert history["accuracy"][0] > 0.8 and set(history) == {"loss", "accuracy", "val_loss", "val_accuracy"}


def test_the_best_setting_scores_highest_on_validation_then_lowest_loss():
    settings = head_settings(_head())
    assert len(settings) == 19 and settings[-1].solver == "lbfgs"
    tried = [
        TriedSetting(settings[0], 0.90, 0.90, 0.30, 5, 1.0),
        TriedSetting(settings[1], 0.92, 0.92, 0.35, 5, 1.0),
        TriedSetting(settings[2], 0.92, 0.92, 0.25, 5, 1.0),
        TriedSetting(settings[-1], 0.91, 0.91, 0.20, 1, 1.0),
    ]
    assert best_setting(tried).setting == settings[2]


def _head():
    from headstart.config import HeadConfig

    return HeadConfig()


def test_a_sweep_trains_the_head_with_the_setting_it_chose(prefect_harness, colour_folder, tiny_backbone_dir, tmp_path):
    from prefect.artifacts import Artifact

    from flows.train import train
    from headstart.config import TrainConfig
    from headstart.registry.runs import Run

    config = TrainConfig.smoke(
        data=str(colour_folder),
        backbone=str(tiny_backbone_dir),
        artifacts_root=tmp_path / "artifacts",
        cache_dir=tmp_path / "cache",
        test_fraction=0.25,
        sweep=True,
    )
    run = Run(train(**config.flat()))
    rows = run.metrics["sweep"]
    assert len(rows) == 19 and sum(row["chosen"] for row in rows) == 1
    chosen = next(row for row in rows if row["chosen"])
    assert chosen == rows[0]  # best first
    for option in ("solver", "learning_rate", "dropout", "weight_decay"):
        assert run.config[option] == chosen[option] == run.lineage.parameters[option]
    assert run.config["sweep"] is True
    table = Artifact.get("headstart-sweep")
    assert table is not None and len(json.loads(table.data)) == 19
    assert "the best on the validation split of the 19 settings a sweep tried" in run.model_card
