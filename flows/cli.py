"""The `headstart` command: train, evaluate, predict."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

EXIT_USAGE = 2


def _set_library_defaults() -> None:
    # TensorFlow's C++ start-up chatter and a deprecation warning from tensorflow-hub's import
    # would bury the few lines a user needs.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # An offline tool sends no usage statistics; the temporary server's heartbeat also races
    # its own SQLite start-up and logs a spurious traceback.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The temporary server's first start creates its database; Prefect's 20 s default is too
    # short for that on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
    # An unwritable PREFECT_HOME is reported in one line, before any work (flows/local_server.py).
    warnings.filterwarnings("ignore", message="Failed to create the Prefect home directory")


class _QuietHooks(logging.Filter):
    """The hook that notes the flow run's id is headstart's bookkeeping, not a step of the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "note_flow_run" not in str(record.msg)


def _train(args) -> int:
    from headstart.config import TrainConfig

    # Options left out on the command line are absent from args (SUPPRESS), so the config's
    # own defaults apply; argparse dest names are the config's field names.
    values = {name: value for name, value in vars(args).items() if name in TrainConfig.options()}
    config = TrainConfig(**values)
    from headstart.data.sources import check_source

    check_source(config.data)
    _check_places(config.runtime.artifacts_root, config.runtime.cache_dir)
    from flows.failures import install_log_filter
    from flows.train import train

    install_log_filter(_QuietHooks())
    # Prefect's log sender writes its failures to a server that stopped answering straight to
    # stderr, one per batch; the outcome is reported in one line instead (_server_lost).
    logging.raiseExceptions = False
    # The flow run's id finds the run directory it committed, should the server be gone before
    # the flow returns it.
    flow_runs: list[str] = []

    def note_flow_run(flow, flow_run, state) -> None:
        flow_runs.append(str(flow_run.id))

    record_flow_run = train.with_options(on_running=[note_flow_run])
    with _prefect_server(getattr(args, "no_prefect", False)) as api_url:
        try:
            run_dir = record_flow_run(**config.flat())
        except Exception as error:
            from flows.local_server import api_problem
            from headstart.errors import file_system_fault

            # A user's error or a full disk is said as such, never taken for a lost server.
            problem = None if file_system_fault(error) is not None else api_problem()
            if problem is None:
                raise
            return _server_lost(config, api_url, problem, flow_runs)
    print(run_dir, flush=True)
    return 0


def _check_places(artifacts_root: Path | None = None, cache_dir: Path | None = None, output: Path | None = None):
    """The places a command will write to, checked before any work (see check_writable_directory).
    predict only reads the registry, and writes to its cache only what is missing there, so a
    read-only registry or a read-only cache that already holds everything serves it."""
    from headstart.errors import HeadstartError
    from headstart.infra.object_store import check_place
    from headstart.infra.storage import check_writable_directory

    if artifacts_root is not None:
        check_place(artifacts_root, "--artifacts-root")
    if cache_dir is not None:
        check_place(cache_dir, "--cache-dir")
    if output is not None:
        if Path(output).is_dir():
            raise HeadstartError(f"--output {output} is a folder; give a file ending in .csv or .parquet")
        check_writable_directory(Path(output).parent, "--output")


@contextlib.contextmanager
def _prefect_server(offline: bool = False):
    """Where the flow reports, checked before any work; yields the API's URL. The configured
    Prefect API; else a local server that is already running (`headstart server start`, on
    Prefect's own host and port settings); else a temporary server for this command, its
    database in PREFECT_HOME, which costs seconds of every command. With --no-prefect, a
    temporary server in a temporary folder, deleted at the end: Prefect 3 runs no flow or task
    without an API, so this is how nothing gets reported."""
    from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    from flows import local_server
    from headstart.errors import HeadstartError

    # Prefect's client retries a server that does not answer with doubling waits, and a run that
    # lost its server makes several requests: one retry rides out a blip, and a server gone shows
    # at once instead of after a storm of retries.
    with temporary_settings({PREFECT_CLIENT_MAX_RETRIES: 1}):
        if offline:
            print("headstart: --no-prefect: this run is not reported to any Prefect server", file=sys.stderr)
            with tempfile.TemporaryDirectory(prefix="headstart-prefect-") as home:
                with local_server.temporary_server(Path(home)) as api_url:
                    yield api_url
            return
        instead = "or add --no-prefect to train without reporting to Prefect"
        configured = PREFECT_API_URL.value()
        if configured:
            problem = local_server.api_problem()
            if problem is not None:
                raise HeadstartError(
                    f"no working Prefect API at {configured} ({problem}); start its server, "
                    f"point PREFECT_API_URL at one that runs, {instead}"
                )
            yield configured
            return
        url = local_server.local_server_url()
        if local_server.is_healthy(url):
            print(f"headstart: reporting to the Prefect server at {url} (dashboard there)", file=sys.stderr)
            with temporary_settings({PREFECT_API_URL: f"{url}/api"}):
                yield f"{url}/api"
            return
        # A server elsewhere needs nothing of PREFECT_HOME (a result it cannot persist is a
        # warning); the temporary server keeps its database there.
        home_problem = local_server.home_problem()
        if home_problem is not None:
            raise HeadstartError(
                f"no Prefect server is running and Prefect cannot write its home folder for a temporary one "
                f"({home_problem}); set PREFECT_HOME to a writable folder, start a server, {instead}"
            )
        print(
            "headstart: no Prefect server is running, so a temporary one starts for this run; "
            "`uv run headstart server start` keeps one (and its dashboard) running",
            file=sys.stderr,
        )
        with local_server.temporary_server() as api_url:
            yield api_url


def _server_lost(config, api_url: str, problem: str, flow_runs: list[str]) -> int:
    """The Prefect server stopped answering during the run: what was done all the same. The run
    directory, where it was committed, is printed last as always; exit code 0 when every step ran
    and only reports were lost, 2 (with what to do) when a step after the commit did not run."""
    from headstart.infra.object_store import local_copy
    from headstart.registry import versions as registry
    from headstart.registry.runs import Run

    lost = f"the Prefect server at {api_url} stopped answering during the run ({problem})"
    _drop_queued_events()
    root = config.runtime.artifacts_root
    # A run committed to a registry on a store was committed in this machine's copy first.
    paths = sorted(local_copy(root).iterdir(), reverse=True) if local_copy(root).is_dir() and flow_runs else []
    committed = [run for run in map(Run.if_complete, paths) if run is not None and _flow_run_id(run) in flow_runs]
    if not committed:
        print(
            f"headstart: error: {lost}; no run directory was committed: start the server again and rerun "
            "(finished feature shards are cached), or add --no-prefect",
            file=sys.stderr,
        )
        return EXIT_USAGE
    run = committed[0]
    undone = []
    if config.export.format == "tflite" and not run.metrics.get("exports"):
        undone.append(f"the export (`headstart export --model {run.path.name}`)")
    gate = run.lineage.gate or {}
    if gate.get("promote") and registry.champion_version(root) != run.path.name:
        undone.append(f"the promotion the gate decided (`headstart models promote {run.path.name}`)")
    print(run.path, flush=True)
    if undone:
        print(f"headstart: error: {lost}; run directory committed, not done: {'; '.join(undone)}", file=sys.stderr)
        return EXIT_USAGE
    print(
        f"headstart: warning: {lost}; the run is complete; its last reports to Prefect were lost "
        "(artifacts, logs, states)",
        file=sys.stderr,
    )
    return 0


def _drop_queued_events() -> None:
    """The events Prefect still holds for a server that is gone (the reports the warning says were
    lost): each would wait out ten websocket reconnections, seconds apiece, before the command may
    end. Prefect has no public way to drop them; should its queue change, they are waited out."""
    from prefect.events.worker import EventsWorker

    with contextlib.suppress(Exception):
        for worker in list(EventsWorker._instances.values()):
            while not worker._queue.empty():
                item = worker._queue.get_nowait()
                worker._queue.task_done()
                if item is None:  # the worker's own stop signal stays
                    worker._queue.put_nowait(None)
                    break


def _flow_run_id(run) -> str | None:
    with contextlib.suppress(Exception):  # a run whose lineage cannot be read is not this one
        return run.lineage.flow_run_id
    return None


def _server(args) -> int:
    from flows import local_server

    if args.action == "start":
        print(f"Prefect server running at {local_server.start()} (dashboard there; `headstart server stop` ends it)")
    elif args.action == "stop":
        print(
            "Prefect server stopped"
            if local_server.stop()
            else "no server started by `headstart server start` is running"
        )
    else:
        url = local_server.local_server_url()
        print(f"Prefect server at {url}: " + ("running" if local_server.is_healthy(url) else "not running"))
    return 0


def _serve(args) -> int:
    from flows.serve import serve_project

    serve_project()
    return 0


def _data_changed(args) -> int:
    """Emits headstart.data.changed for a folder, always (the script that calls it knows it copied
    data in), and records the look, so that the next `watch` does not report the same change."""
    from prefect.events.worker import EventsWorker

    from headstart.config import WatchConfig
    from headstart.data.changes import looking_at, watched_folder
    from headstart.errors import HeadstartError
    from tasks.watch import emit_data_changed

    config = WatchConfig(data=args.path, **({"cache_dir": args.cache_dir} if args.cache_dir else {}))
    watched_folder(config.data)  # before asking any server
    with _deployments_server("nothing was emitted") as api_url:
        with looking_at(Path(config.data), config.cache_dir) as change:
            if emit_data_changed(change, by="headstart data changed") is None:
                raise HeadstartError(f"Prefect did not send the event to {api_url}; nothing was recorded")
            EventsWorker.drain_all()  # sent before this command ends
    print(f"headstart: {change.summary()}; headstart.data.changed emitted to {api_url}")
    return 0


@contextlib.contextmanager
def _deployments_server(nothing_done: str):
    """Prefect's settings pointed at the server the deployments run on (never a temporary one),
    once it answers; yields its API URL. `nothing_done` says what was not done where none answers."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows import local_server
    from headstart.errors import HeadstartError

    api_url = local_server.deployments_api_url()
    if api_url is None:
        raise HeadstartError(
            f"no Prefect server answers at {local_server.local_server_url()} and PREFECT_API_URL is not set; "
            f"{nothing_done}: point PREFECT_API_URL at the server the deployments run on (or `headstart server start`)"
        )
    with temporary_settings({PREFECT_API_URL: api_url}):
        problem = local_server.api_problem()
        if problem is not None:
            raise HeadstartError(
                f"the Prefect server at {api_url} does not answer ({problem}); {nothing_done}: "
                "start it, or point PREFECT_API_URL at the server the deployments run on"
            )
        yield api_url


def _notify(args) -> int:
    """Sets up (or replaces, by name) the automations that notify through a notification block."""
    from prefect.settings import PREFECT_UI_URL

    from flows import automations

    with _deployments_server("no automation was set up"):
        block_id, block = automations.notification_block(args.block)
        for name, done in automations.set_up(block_id, PREFECT_UI_URL.value()):
            print(f"headstart: automation {name!r} {done}; it notifies through {block}")
    return 0


def _evaluate(args) -> int:
    from headstart.config import EvaluateConfig
    from headstart.evaluation.metrics import format_metrics
    from headstart.registry.runs import Run
    from headstart.serving.inference import evaluate_folder

    options = EvaluateConfig.model_fields
    config = EvaluateConfig(**{name: value for name, value in vars(args).items() if name in options})
    metrics = evaluate_folder(Run(Path(config.model)), Path(config.data), config.batch_size)
    if args.json:
        print(json.dumps(metrics))
    else:
        print(format_metrics(metrics))
        if metrics["skipped"]:
            print(f"\n{len(metrics['skipped'])} files skipped (unreadable or not images)")
    return 0


def _predict(args) -> int:
    from headstart.config import PredictConfig
    from headstart.serving.predict import check_inputs, predict_as_configured, require_images, write_predictions

    config = PredictConfig(**{name: value for name, value in vars(args).items() if name in PredictConfig.model_fields})
    _check_places(output=config.output)
    check_inputs(config.inputs)
    predictions, _ = predict_as_configured(config)
    for entry in predictions.skipped:
        print(f"headstart: skipped {entry['path']}: {entry['reason']}", file=sys.stderr)
    require_images(predictions, config.inputs)
    if config.output:
        print(
            f"{len(predictions.paths)} predictions written to {write_predictions(predictions, config.output)}",
            file=sys.stderr,
        )
    for row, probabilities in zip(predictions.rows(), predictions.probabilities):
        if args.json:
            print(json.dumps({**row, "probabilities": dict(zip(predictions.class_names, map(float, probabilities)))}))
        elif not config.output:
            print(f"{row['path']}\t{row['label']}\t{row['probability']:.4f}")
    return 0


def _explain(args) -> int:
    from headstart.config import as_place
    from headstart.infra.storage import check_writable_directory
    from headstart.registry import versions as registry
    from headstart.serving.explain import check_explainable, explain_files

    check_explainable(args.model)
    check_writable_directory(Path(args.output), "--output")
    run = registry.resolve(as_place(args.artifacts_root), args.model)
    explained = explain_files(run, [Path(path) for path in args.inputs], Path(args.output))
    for entry in explained.skipped:
        print(f"headstart: skipped {entry['path']}: {entry['reason']}", file=sys.stderr)
    for path, label, probability, overlay in explained.rows:
        print(f"{path}\t{label}\t{probability:.4f}\t{overlay}")
    return 0


def _export(args) -> int:
    from headstart.config import as_place
    from headstart.edge import export_images, export_tflite
    from headstart.registry import versions as registry

    run = registry.resolve(as_place(args.artifacts_root), args.model)
    record = export_tflite(
        run,
        args.quantize,
        export_images(run, Path(args.cache_dir) if args.cache_dir else None),
        Path(args.output) if args.output else None,
    )
    print(f"headstart: {record.summary}", file=sys.stderr)
    print(run.path / record.file, flush=True)
    return 1 if args.require_target and not record.meets_target else 0


def _models(args) -> int:
    from headstart.config import as_place
    from headstart.errors import HeadstartError
    from headstart.registry import versions as registry

    root = as_place(args.artifacts_root)
    if args.action == "promote":
        entry = registry.promote(root, args.version, args.reason)
        print(f"champion: {entry['version']} (was {entry['previous'] or 'none'})", flush=True)
        _publish_champion(root)
        return 0
    if args.action == "rollback":
        entry = registry.rollback(root, args.reason)
        print(f"champion: {entry['version']} (was {entry['previous']})", flush=True)
        _publish_champion(root)
        return 0
    rows = registry.versions(root)
    # Listed first, so that whoever fixes an unusable champion sees the versions to choose from.
    _print_versions(root, rows, args.json)
    try:
        champion = registry.champion(root)
    except HeadstartError:
        sys.stdout.flush()
        raise
    if champion is None and not args.json and rows:
        print("\nno champion yet: `headstart models promote VERSION`")
    return 0


def _review(args) -> int:
    from headstart.config import as_place
    from headstart.errors import HeadstartError
    from headstart.registry import versions as registry
    from headstart.reporting.label_issues import review_lines, run_label_issues

    if args.top is not None and args.top < 1:
        raise HeadstartError(f"--top {args.top}: give a number of images from 1 up")
    run = registry.resolve(as_place(args.artifacts_root), args.run)
    if args.json:
        print(json.dumps(run_label_issues(run).slice(0, args.top).to_pylist()))
        return 0
    print("\n".join(review_lines(run, args.top)))
    return 0


def _publish_champion(root: Path) -> None:
    """The new champion on the dashboard (the variable headstart_champion, the artifact
    headstart-champion), where a Prefect server answers: the configured one, else a local one that
    runs. Best-effort: the registry's switch is made, and the command succeeds, whatever happens here."""
    from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    from flows import local_server
    from tasks.events import CHAMPION_VARIABLE
    from tasks.outcome import publish_champion

    not_shown = f"the dashboard's champion ({CHAMPION_VARIABLE}) is updated at the next promotion or rollback"
    try:
        api_url = local_server.deployments_api_url()
        if api_url is None:
            print(f"headstart: no Prefect server is running; {not_shown} made while one runs", file=sys.stderr)
            return
        with temporary_settings({PREFECT_API_URL: api_url, PREFECT_CLIENT_MAX_RETRIES: 0}):
            problem = local_server.api_problem()
            if problem is not None:
                print(
                    f"headstart: warning: the Prefect server at {api_url} does not answer ({problem}); {not_shown}",
                    file=sys.stderr,
                )
                return
            publish_champion(root)
    except Exception as error:  # noqa: BLE001 - the switch is made; the dashboard is a courtesy
        from headstart.errors import first_line

        print(f"headstart: warning: the dashboard's champion was not updated ({first_line(error)})", file=sys.stderr)


def _print_versions(root: Path, rows: list, as_json: bool) -> None:
    if as_json:
        print(json.dumps([row.to_dict() for row in rows]))
        return
    if not rows:
        print(f"no versions in {root}")
        return
    width = max(len(row.version) for row in rows)
    print(f"  {'version':<{width}}  accuracy  test images  classes / created")
    for row in rows:
        if row.damaged is not None:
            print(f"{'*' if row.champion else ' '} {row.version:<{width}}  damaged: {row.damaged}")
            continue
        accuracy = f"{row.accuracy:.4f}" if row.accuracy is not None else "-"
        print(
            f"{'*' if row.champion else ' '} {row.version:<{width}}  {accuracy:<8}  "
            f"{row.n if row.n is not None else '-':<11}  "
            f"{', '.join(row.class_names)} / {row.created_at}"
        )
    if any(row.champion for row in rows):
        print("\n* champion")


def build_parser(train_config: type | None = None) -> argparse.ArgumentParser:
    """The command line; `train`'s options are TrainConfig's (or `train_config`'s), one each, and
    `predict`'s PredictConfig's."""
    from flows.parameters import add_config_options
    from headstart.config import EvaluateConfig, PredictConfig, TrainConfig

    train_config = train_config or TrainConfig
    parser = argparse.ArgumentParser(
        prog="headstart",
        description=(
            "Transfer learning for image classification: a frozen ImageNet MobileNetV2 and a new head, "
            "as a Prefect flow."
        ),
    )
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train", help="train a classifier; prints the run directory last", argument_default=argparse.SUPPRESS
    )
    add_config_options(train, train_config)
    train.add_argument(
        "--no-prefect",
        action="store_true",
        default=False,
        help="train without reporting to a Prefect server (the run directory is written as always)",
    )
    train.set_defaults(handler=_train)

    evaluate = commands.add_parser(
        "evaluate", help="measure a trained run on a labelled folder", argument_default=argparse.SUPPRESS
    )
    add_config_options(evaluate, EvaluateConfig)
    evaluate.add_argument("--json", action="store_true", default=False, help="print one JSON object")
    evaluate.set_defaults(handler=_evaluate)

    predict = commands.add_parser(
        "predict", help="label image files and folders with a trained model", argument_default=argparse.SUPPRESS
    )
    add_config_options(predict, PredictConfig, positional=("inputs",))
    predict.add_argument("--json", action="store_true", default=False, help="print one JSON object per image")
    predict.set_defaults(handler=_predict)

    explain = commands.add_parser(
        "explain", help="show where a trained model looked in each image: one heatmap overlay PNG per image"
    )
    explain.add_argument("inputs", nargs="+", metavar="IMAGE", help="image files or folders holding images")
    explain.add_argument(
        "--model",
        default="champion",
        help="'champion' (default), a version listed by 'headstart models', or a run directory",
    )
    explain.add_argument("--output", default="explained", help="the folder the overlays go to (default ./explained)")
    explain.add_argument(
        "--artifacts-root", default="artifacts", help="where the registry's versions are (default ./artifacts)"
    )
    explain.set_defaults(handler=_explain)

    export = commands.add_parser(
        "export", help="write a trained model as one .tflite file for phones and boards, class names inside"
    )
    export.add_argument(
        "--model",
        default="champion",
        help="'champion' (default), a version listed by 'headstart models', or a run directory",
    )
    export.add_argument("--format", choices=["tflite"], default="tflite", help="file format (default tflite)")
    export.add_argument(
        "--quantize",
        choices=["none", "int8"],
        default="none",
        help=(
            "none: float32 weights and activations (default); int8: full-integer, calibrated on the run's "
            "training images"
        ),
    )
    export.add_argument(
        "--output", help="the file to write (default: exports/model-float32.tflite or model-int8.tflite in the run)"
    )
    export.add_argument(
        "--artifacts-root", default="artifacts", help="where the registry's versions are (default ./artifacts)"
    )
    export.add_argument(
        "--cache-dir", help="where the run's data listing is cached (default: the run's own cache directory)"
    )
    export.add_argument(
        "--require-target",
        action="store_true",
        help="exit with status 1 when the file misses its parity target (it is written and recorded all the same)",
    )
    export.set_defaults(handler=_export)

    models = commands.add_parser("models", help="list the registry's versions, newest first; promote one, or roll back")
    models.add_argument("--artifacts-root", default="artifacts", help="where run directories go (default ./artifacts)")
    models.add_argument("--json", action="store_true", help="print one JSON list")
    actions = models.add_subparsers(dest="action")
    root_option = argparse.ArgumentParser(add_help=False)
    root_option.add_argument(
        "--artifacts-root", default=argparse.SUPPRESS, help="where run directories go (default ./artifacts)"
    )
    promote = actions.add_parser("promote", parents=[root_option], help="make a version the champion")
    promote.add_argument("version", help="a version listed by 'headstart models'")
    promote.add_argument("--reason", default="promoted by hand", help="recorded in the champion's history")
    rollback = actions.add_parser(
        "rollback", parents=[root_option], help="make the previous champion the champion again"
    )
    rollback.add_argument("--reason", default="rolled back by hand", help="recorded in the champion's history")
    models.set_defaults(handler=_models)

    review = commands.add_parser(
        "review", help="list a run's training images whose label is probably wrong, most likely first"
    )
    review.add_argument(
        "run", metavar="RUN", help="'champion', a version listed by 'headstart models', or a run directory"
    )
    review.add_argument("--top", type=int, help="only the N most likely (default: every flagged image)")
    review.add_argument(
        "--artifacts-root", default="artifacts", help="where the registry's versions are (default ./artifacts)"
    )
    review.add_argument("--json", action="store_true", help="print one JSON list")
    review.set_defaults(handler=_review)

    data = commands.add_parser("data", help="tell the Prefect server that a data folder changed")
    data_actions = data.add_subparsers(dest="action", required=True)
    changed = data_actions.add_parser(
        "changed",
        help=(
            "emit the event headstart.data.changed for a folder (the `retrain` deployment's trigger starts a "
            "retrain on it); for scripts that copy data in"
        ),
    )
    changed.add_argument("path", metavar="PATH", help="the folder of class sub-folders that changed")
    changed.add_argument(
        "--cache-dir",
        help="where the looks at data folders are recorded (default .cache/headstart, as in the deployments)",
    )
    changed.set_defaults(handler=_data_changed)

    notify = commands.add_parser(
        "notify",
        help=(
            "set up the automations that send a notification when a train, retrain, predict or watch run fails "
            "or crashes, and when the gate keeps the champion (again: replaces them)"
        ),
    )
    notify.add_argument(
        "--block",
        required=True,
        metavar="TYPE/NAME",
        help="the notification block to send through, as `prefect block ls` lists it (slack-webhook/alerts)",
    )
    notify.set_defaults(handler=_notify)

    server = commands.add_parser(
        "server", help="keep a local Prefect server (and its dashboard) running between commands"
    )
    server.add_argument("action", choices=["start", "stop", "status"])
    server.set_defaults(handler=_server)

    serve = commands.add_parser(
        "serve", help="run prefect.yaml's deployments (schedules included) from this process, without a worker"
    )
    serve.set_defaults(handler=_serve)
    return parser


def _one_line(error: Exception) -> str:
    from flows.failures import expected_failure
    from headstart.errors import first_line

    return expected_failure(error, flags=True) or first_line(error)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _set_library_defaults()
    from pydantic import ValidationError

    from headstart.errors import HeadstartError, file_system_fault

    try:
        return args.handler(args)
    except (HeadstartError, ValidationError) as error:
        print(f"headstart: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("headstart: interrupted; finished cache shards are kept", file=sys.stderr)
        return 130
    except BrokenPipeError:  # whoever read the output (`| head`) stopped reading: nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as error:
        # A full disk, a read-only mount, a file where a folder belongs (an OSError, or
        # TensorFlow's own error type for it): the user's to put right. Anything else is a bug.
        fault = file_system_fault(error)
        if fault is None:
            raise
        print(f"headstart: error: {_one_line(fault)}", file=sys.stderr)
        return EXIT_USAGE


def run() -> None:
    """The `headstart` command: `main`, then an exit that skips tearing down the interpreter.

    Once every exit handler has run (Prefect sends its last logs and events, files are closed),
    freeing TensorFlow's and LiteRT's objects one by one is all that is left, and a user waits for
    it: a large share of a one-image predict (benchmarks/results/speed-tricks.md).
    """
    status = 1  # an exception escaping main() exits with 1, as Python would

    def exit_without_teardown() -> None:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)

    # Handlers run last-registered first: registered before anything else, this one runs last.
    atexit.register(exit_without_teardown)
    try:
        status = main()
    except SystemExit as request:  # argparse's usage errors and --help
        status = request.code if isinstance(request.code, int) else int(request.code is not None)
        raise
    sys.exit(status)


if __name__ == "__main__":
    run()
