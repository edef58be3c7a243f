"""The `train` flow: download → preprocess → build_model → train_head → evaluate → visualize → publish."""

from __future__ import annotations

from prefect import flow

from headstart.config import TrainConfig
from headstart.runs import find_identical_run, training_key
from tasks.data import download, preprocess
from tasks.evaluation import evaluate, visualize
from tasks.model import build_model, train_head
from tasks.publish import publish, reuse_identical_run


@flow(name="train", log_prints=True)
def train(config: TrainConfig) -> str:
    """Trains a new classification head on a frozen ImageNet backbone; returns the run directory."""
    manifest, report = download(config)
    backbone, features = preprocess(config, manifest)
    key = training_key(config, manifest.fingerprint, backbone)
    previous = find_identical_run(config.cache_dir, key) if config.reuse_identical_runs else None
    if previous is not None:
        return reuse_identical_run(config, previous)
    classifier = build_model(config, backbone, manifest.class_names)
    history = train_head(config, classifier, features)
    metrics, probabilities = evaluate(classifier, features, manifest.class_names)
    figures = visualize(config, history, metrics, probabilities, features)
    return publish(config, key, classifier, backbone, features, report, history, metrics, figures)
