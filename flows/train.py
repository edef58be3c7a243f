"""The `train` flow: download → prepare_backbone → plan_extraction → extract_features (per shard) →
assemble_features → [try_head_setting (per setting) → choose_head_setting] → build_model →
train_head → [label_issues → [build_model → train_head]]
→ [fine_tune → plan_extraction → extract_features → assemble_features → build_model] →
calibrate → evaluate → near_duplicates → gate → visualize → where_the_model_looked → publish → [export] → promote (where
the gate decided so); or, when every input matches an earlier run, reuse_identical_run →
[export] → gate → promote in place of the steps after assemble_features. The first bracketed
steps run with --sweep: a grid of head settings is tried on the cached features and the best on
validation trains the head. label_issues (unless --no-label-issues) ranks the training images
whose label is probably wrong, from out-of-fold heads; with --drop-label-issues, build_model →
train_head again without them. The fine_tune steps run with --fine-tune: the backbone's top stages are
trained with the head, and the fine-tuned backbone's features replace the frozen one's. export
runs with --export tflite: the run's classifier as .tflite files for devices, float32 and int8.
calibrate folds a temperature fitted on validation into the head (headstart.evaluation.calibration).
near_duplicates flags test and validation images whose nearest training image is almost the same
photo, and gives the test accuracy without them.
With the gate on, check_champion first makes sure the champion can be read, before any work;
promote switches the champion only if it is still the one the gate compared with.
A mistake a user can put right (a missing folder, a rejected parameter) ends the run Failed with
its one line as the state message (flows/failures.py)."""

from __future__ import annotations

import sys
from pathlib import Path

from prefect import flow, unmapped
from prefect.states import Completed, State
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from flows.failures import one_line_failures
from flows.parameters import parameters_from
from flows.results import keep_results_in
from headstart.config import RuntimeConfig, TrainConfig
from headstart.data.sources import check_source
from headstart.features.extraction import ExtractionContext, ExtractionSettings
from headstart.infra.object_store import check_place, local_copy
from headstart.registry.reuse import find_identical_run, training_key
from headstart.registry.runs import Run
from headstart.reporting.outcome import state_message
from headstart.training.sweep import head_settings
from tasks.data import download, prepare_backbone, warn_skipped
from tasks.evaluation import calibrate, evaluate, visualize, where_the_model_looked
from tasks.export import export
from tasks.features import assemble_features, extract_features, plan_features
from tasks.fine_tuning import fine_tune
from tasks.gate import check_champion, gate, gate_identical_run, promote
from tasks.label_issues import label_issues
from tasks.leakage import near_duplicates
from tasks.model import build_model, train_head
from tasks.outcome import announce
from tasks.publish import publish, reuse_identical_run
from tasks.sweep import choose_head_setting, try_head_setting


@flow(name="train", log_prints=True, persist_result=True, result_serializer="json")
@parameters_from(TrainConfig)
@one_line_failures
def train(**parameters) -> str:
    """Trains a new classification head on a frozen ImageNet backbone; returns the run directory
    (the flow run's result), the gate's outcome in one line as the run's state message. The
    parameters are TrainConfig's options (see headstart.config)."""
    config = TrainConfig(**parameters)
    check_source(config.data)
    cache, artifacts_root = config.runtime.cache_dir, config.runtime.artifacts_root
    check_place(artifacts_root, "--artifacts-root")
    check_place(cache, "--cache-dir")
    keep_results_in(artifacts_root)
    if config.gate.enabled:
        check_champion(artifacts_root)
    # The feature steps take the cache as a place (a store URL's shards are shared); every other
    # step works in this machine's own copy of it.
    cache_dir = local_copy(cache)
    manifest, report = download(config.data, cache_dir)
    backbone = prepare_backbone(config.backbone, manifest, cache)
    shards = plan_features(manifest, backbone, cache, config.backbone.shard_size)
    settings = ExtractionSettings(config.backbone.engine, config.backbone.threads, config.backbone.batch_size)
    with ExtractionContext(cache, settings) as extraction:
        features, manifest, report = _features(config, manifest, report, backbone, shards, extraction)
        warn_skipped(report.skipped)
        key = training_key(config, manifest.fingerprint, backbone.fingerprint)
        reuse = config.runtime.reuse_identical_runs
        previous = find_identical_run(cache_dir, key, artifacts_root) if reuse else None
        if previous is not None:
            return _reused(config, key, previous, manifest, backbone, features)
        sweep = None
        if config.head.sweep:
            config, sweep = _swept(config, features, len(manifest.class_names))
        classifier = build_model(config.head, backbone, manifest.class_names)
        history = train_head(config.head, classifier, features)
        issues = None
        if config.evaluation.label_issues:
            issues = label_issues(config.evaluation, config.head, features, manifest.class_names)
            if config.evaluation.drop_label_issues and issues.summary["left_out"]:
                classifier = build_model(config.head, backbone, manifest.class_names)
                history = train_head(config.head, classifier, features, leave_out=issues.hashes)
        tuned, frozen_features, frozen_backbone, frozen_manifest = None, features, backbone, manifest
        if config.fine_tuning.enabled:
            tuned = fine_tune(config.fine_tuning, config.head, cache_dir, key, backbone, classifier, features)
            # From here on the fine-tuned network is the run's backbone: its features are what
            # evaluation and the gate read, as for any backbone.
            backbone = tuned.backbone
            shards = plan_features(manifest, backbone, cache, config.backbone.shard_size)
            features, manifest, report = _features(config, manifest, report, backbone, shards, extraction)
            classifier = build_model(config.head, backbone, manifest.class_names, head_from=classifier)
            if manifest.fingerprint != frozen_manifest.fingerprint:  # files changed meanwhile were left out
                frozen_features, _, _ = assemble_features(manifest, report, frozen_backbone, cache, [])
    calibration = calibrate(config.head.calibrate, classifier, features)
    metrics, probabilities = evaluate(classifier, features, manifest.class_names, calibration, config.evaluation)
    # Near-duplicates are judged on the frozen backbone's features, for which the threshold is calibrated.
    leakage = near_duplicates(config.evaluation, frozen_features, probabilities, manifest.class_names)
    decision = None
    if config.gate.enabled:
        source = config.data.source
        decision = gate(config.gate, artifacts_root, source, backbone, features, probabilities, manifest.class_names)
    figures = visualize(config.head.seed, history, metrics, probabilities, features, leakage, tuned)
    names = manifest.class_names
    figures |= where_the_model_looked(config.head.seed, backbone, classifier, features, probabilities, names)
    run_dir = publish(
        config,
        key,
        classifier,
        backbone,
        features,
        report,
        history,
        metrics,
        figures,
        decision,
        leakage,
        tuned,
        sweep,
        issues,
    )
    if config.export.format == "tflite":
        export(run_dir, manifest)
    if decision is not None and decision.promote:
        decision = promote(artifacts_root, run_dir, decision)
    if decision is not None:
        announce(artifacts_root, run_dir, decision)
    print(
        f"headstart: test accuracy {metrics['accuracy']:.4f} on {metrics['n']} images; run directory {run_dir}"
        + (f"; gate: {decision.reason}" if decision is not None else "; gate off")
    )
    return _finished(run_dir, metrics["accuracy"], decision)


def _finished(run_dir: str, accuracy: float, decision) -> State:
    """Completed, with the run directory as its result, and the gate's outcome (promoted, or the
    champion kept, and the figures) as the message the dashboard shows beside the state."""
    return Completed(message=state_message(Path(run_dir).name, accuracy, decision), data=run_dir)


def _reused(config: TrainConfig, key: str, previous, manifest, backbone, features) -> State:
    """The steps after assemble_features where an earlier run with identical inputs stands for
    this one: it is exported where asked, and gated like a new model."""
    run_dir = reuse_identical_run(config.runtime, key, previous)
    if config.export.format == "tflite":
        export(run_dir, manifest)
    decision = None
    if config.gate.enabled:
        decision = gate_identical_run(
            config.gate,
            config.runtime.artifacts_root,
            config.data.source,
            run_dir,
            backbone,
            features,
            manifest.class_names,
        )
    if decision is not None and decision.promote:
        # The earlier run's lineage records its own gate's decision, not this one.
        decision = promote(config.runtime.artifacts_root, run_dir, decision, recorded_in_run=False)
    if decision is not None:
        announce(config.runtime.artifacts_root, run_dir, decision)
    print(
        f"headstart: every input matches {previous}; nothing trained; run directory {run_dir}"
        + (f"; gate: {decision.reason}" if decision is not None else "; gate off")
    )
    return _finished(run_dir, Run(run_dir).metrics["accuracy"], decision)


def _features(config: TrainConfig, manifest, report, backbone, shards, extraction: ExtractionContext):
    """The dataset's features under this backbone: the shards not cached yet extracted (one task
    each), then every image's features collected into one file."""
    extracted = []
    if shards:
        with extraction_runner(config.runtime) as runner:
            labels = [f"{i + 1}/{len(shards)}" for i in range(len(shards))]
            extracted = runner.map(
                extract_features,
                {"shard": shards, "backbone": unmapped(backbone), "context": unmapped(extraction), "label": labels},
            ).result()
    return assemble_features(manifest, report, backbone, extraction.cache, extracted)


def _swept(config: TrainConfig, features, num_classes: int) -> tuple[TrainConfig, list[dict]]:
    """The configuration with the head settings that scored best on validation among the sweep's
    (one task each, spread over a local Dask cluster where that is the task runner), and the
    sweep's rows. The tasks read the features file by its path, which the workers of a cluster
    given by address may not see: there, they run in this process."""
    settings = head_settings(config.head)
    runtime = (
        config.runtime.model_copy(update={"task_runner": "local"}) if config.runtime.dask_address else config.runtime
    )
    with extraction_runner(runtime) as runner:
        tried = runner.map(
            try_head_setting,
            {
                "setting": settings,
                "head": unmapped(config.head),
                "features": unmapped(features),
                "num_classes": unmapped(num_classes),
                "label": [setting.label for setting in settings],
            },
        ).result()
    chosen, rows = choose_head_setting(tried)
    return config.with_options(**chosen.options()), rows


def extraction_runner(runtime: RuntimeConfig) -> TaskRunner:
    """Where the extraction tasks run: a Dask cluster (an existing one, or a local one started for
    the run), or one thread of this process, since the forward pass already uses every core and a
    second engine would only compete. Every other step runs in the flow's own thread."""
    if runtime.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        _sent_by_value()

        if runtime.dask_address:
            return DaskTaskRunner(address=runtime.dask_address)
        return DaskTaskRunner(
            cluster_kwargs={"n_workers": runtime.dask_workers, "threads_per_worker": 1, "processes": True}
        )
    return ThreadPoolTaskRunner(max_workers=1)


def _sent_by_value() -> None:
    """A deployment's run loads this file as a script, under a module name a Dask worker cannot
    import; what of it travels with the extraction tasks (the flow in their context) then travels
    by value."""
    if __name__ != "flows.train":
        import cloudpickle

        cloudpickle.register_pickle_by_value(sys.modules[__name__])
