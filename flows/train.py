"""The `train` flow: download → preprocess → build_model → train_head → evaluate → visualize → publish."""

from __future__ import annotations

from prefect import flow

from headstart.config import TrainConfig
from tasks.data import download, preprocess
from tasks.evaluation import evaluate, publish, visualize
from tasks.model import build_model, train_head


@flow(name="train", log_prints=True)
def train(config: TrainConfig) -> str:
    """Trains a new classification head on a frozen ImageNet backbone; returns the run directory."""
    manifest, report = download(config)
    backbone, features = preprocess(config, manifest)
    classifier = build_model(config, backbone, manifest.class_names)
    history = train_head(config, classifier, features)
    metrics, probabilities = evaluate(classifier, features, manifest.class_names)
    figures = visualize(config, history, metrics, probabilities, features)
    return publish(config, classifier, backbone, features, report, history, metrics, figures)
