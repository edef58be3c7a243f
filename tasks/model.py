"""Prefect tasks around headstart.model: build_model and train_head."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from headstart.backbone import Backbone
from headstart.config import TrainConfig
from headstart.features import FeatureSet
from headstart.keras import keras
from headstart.model import build_classifier, train_head as fit_head


@task(name="build_model", cache_policy=NO_CACHE)
def build_model(config: TrainConfig, backbone: Backbone, class_names: tuple[str, ...]) -> keras.Model:
    return build_classifier(backbone.keras_layer(trainable=False), len(class_names), config.image_size, config.dropout, config.seed)


@task(name="train_head", cache_policy=NO_CACHE)
def train_head(config: TrainConfig, classifier: keras.Model, features: FeatureSet) -> dict[str, list[float]]:
    train = features.load("train")[:2]
    validation = features.load("validation")[:2]
    return fit_head(
        classifier, train, validation, epochs=config.epochs, batch_size=config.batch_size,
        learning_rate=config.learning_rate, patience=config.patience, seed=config.seed,
    )
