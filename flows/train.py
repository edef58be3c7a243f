"""The `train` flow: download → preprocess → extract_features → build_model → train_head → evaluate → visualize → publish."""

from __future__ import annotations

from prefect import flow, unmapped
from prefect.task_runners import ThreadPoolTaskRunner

from headstart.config import TrainConfig
from headstart.features import ExtractionSettings
from headstart.runs import find_identical_run, training_key
from tasks.data import assemble_features, download, extract_features, preprocess
from tasks.evaluation import evaluate, import_plotting_in_background, visualize
from tasks.model import build_model, train_head
from tasks.publish import publish, reuse_identical_run


# One worker: the forward pass already uses every core, and a second engine would only compete.
@flow(name="train", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=1))
def train(config: TrainConfig) -> str:
    """Trains a new classification head on a frozen ImageNet backbone; returns the run directory."""
    manifest, report = download(config)
    backbone, shards = preprocess(config, manifest)
    settings = ExtractionSettings(config.engine, config.threads, config.extraction_batch_size)
    if shards:  # while the extraction runs: TensorFlow and the backbone for build_model, matplotlib for visualize
        backbone.load_keras_layer_in_background()
        import_plotting_in_background()
    engines = extract_features.map(
        shards, unmapped(backbone), unmapped(config.cache_dir), unmapped(settings), [f"{i + 1}/{len(shards)}" for i in range(len(shards))],
    ).result()
    features = assemble_features(manifest, backbone, config.cache_dir, sum(map(len, shards)), engines)
    key = training_key(config, manifest.fingerprint, backbone)
    previous = find_identical_run(config.cache_dir, key) if config.reuse_identical_runs else None
    if previous is not None:
        return reuse_identical_run(config, previous)
    classifier = build_model(config, backbone, manifest.class_names)
    history = train_head(config, classifier, features)
    metrics, probabilities = evaluate(classifier, features, manifest.class_names)
    figures = visualize(config, history, metrics, probabilities, features)
    return publish(config, key, classifier, backbone, features, report, history, metrics, figures)


def run_train(config: TrainConfig) -> str:
    """Runs `train` on the task runner the configuration asks for (local threads or a Dask cluster)."""
    if config.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if config.dask_address:
            runner = DaskTaskRunner(address=config.dask_address)
        else:
            runner = DaskTaskRunner(cluster_kwargs={"n_workers": config.dask_workers, "threads_per_worker": 1, "processes": True})
        return train.with_options(task_runner=runner)(config)
    return train(config)
