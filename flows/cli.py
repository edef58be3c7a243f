"""The `headstart` command: train, evaluate, predict."""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import sys
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


class _NoTracebackForUserErrors(logging.Filter):
    """Prefect logs failed runs with tracebacks; a user's mistake, or a full or read-only disk,
    deserves one line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        from headstart.errors import as_user_error

        if record.exc_info and as_user_error(record.exc_info[1]) is not None:
            record.exc_info, record.exc_text = None, None
            message = record.getMessage().strip()
            record.msg, record.args = message.splitlines()[0] if message else "", ()
        return True


def _install_log_filter() -> None:
    user_errors = _NoTracebackForUserErrors()
    for name in [None, *logging.root.manager.loggerDict]:
        logger = logging.getLogger(name)
        for handler in getattr(logger, "handlers", []):
            handler.addFilter(user_errors)


def _train(args) -> int:
    from headstart.config import TrainConfig

    # Options left out on the command line are absent from args (SUPPRESS), so the config's
    # own defaults apply; argparse dest names are the config's field names.
    values = {name: value for name, value in vars(args).items() if name in TrainConfig.options()}
    config = TrainConfig(**values)
    if config.data.source != "cifar10" and not Path(config.data.source).is_dir():
        from headstart.errors import HeadstartError

        raise HeadstartError(
            f"data folder not found: {Path(config.data.source).absolute()} "
            "(give a folder of class sub-folders, or 'cifar10')"
        )
    _check_places(config.runtime.artifacts_root, config.runtime.cache_dir)
    from flows.train import train

    _install_log_filter()
    with _prefect_server():
        run_dir = train(**config.flat())
    print(run_dir, flush=True)
    return 0


def _check_places(artifacts_root: Path, cache_dir: Path) -> None:
    """The flow checks these itself (a deployment's run has no CLI); checked here too, they fail
    before a Prefect server is started for nothing."""
    from headstart.infra.storage import check_writable_folder

    check_writable_folder(artifacts_root, "--artifacts-root")
    check_writable_folder(cache_dir, "--cache-dir")


def _prefect_server():
    """Where the flow reports: the configured Prefect API; else a local server that is already
    running (`headstart server start`, on Prefect's own host and port settings); else a
    temporary server Prefect starts for this command, which costs seconds of every command."""
    import contextlib

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.local_server import is_healthy, local_server_url

    if PREFECT_API_URL.value():
        return contextlib.nullcontext()
    url = local_server_url()
    if not is_healthy(url):
        print(
            "headstart: no Prefect server is running, so a temporary one starts for this run; "
            "`uv run headstart server start` keeps one (and its dashboard) running",
            file=sys.stderr,
        )
        return contextlib.nullcontext()
    print(f"headstart: reporting to the Prefect server at {url} (dashboard there)", file=sys.stderr)
    return temporary_settings({PREFECT_API_URL: f"{url}/api"})


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


def _evaluate(args) -> int:
    from headstart.config import EvaluateConfig

    config = EvaluateConfig(model=args.model, data=args.data, batch_size=args.batch_size)
    from headstart.evaluation.metrics import format_metrics
    from headstart.registry.runs import Run
    from headstart.serving.inference import evaluate_folder

    metrics = evaluate_folder(Run(config.model), config.data, config.batch_size)
    if args.json:
        print(json.dumps(metrics))
    else:
        print(format_metrics(metrics))
        if metrics["skipped"]:
            print(f"\n{len(metrics['skipped'])} files skipped (unreadable or not images)")
    return 0


def _predict(args) -> int:
    from headstart.config import PredictConfig
    from headstart.serving.predict import check_output, predict_as_configured, write_predictions

    config = PredictConfig(**{name: value for name, value in vars(args).items() if name in PredictConfig.model_fields})
    if config.output:
        check_output(config.output)
    predictions, _ = predict_as_configured(config)
    for entry in predictions.skipped:
        print(f"headstart: skipped {entry['path']}: {entry['reason']}", file=sys.stderr)
    if not predictions.paths:
        from headstart.errors import HeadstartError

        skipped = f" ({len(predictions.skipped)} skipped, reasons above)" if predictions.skipped else ""
        raise HeadstartError(f"no image to label in {', '.join(config.inputs)}{skipped}: give image files or folders")
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


def _export(args) -> int:
    from headstart.edge import export_images, export_tflite
    from headstart.registry import versions as registry

    run = registry.resolve(Path(args.artifacts_root), args.model)
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
    from headstart.registry import versions as registry

    root = Path(args.artifacts_root)
    if args.action == "promote":
        entry = registry.promote(root, args.version, args.reason)
        print(f"champion: {entry['version']} (was {entry['previous'] or 'none'})")
        return 0
    if args.action == "rollback":
        entry = registry.rollback(root, args.reason)
        print(f"champion: {entry['version']} (was {entry['previous']})")
        return 0
    rows = registry.versions(root)
    if args.json:
        print(json.dumps([row.to_dict() for row in rows]))
        return 0
    if not rows:
        print(f"no versions in {root}")
        return 0
    width = max(len(row.version) for row in rows)
    print(f"  {'version':<{width}}  accuracy  test images  classes / created")
    for row in rows:
        accuracy = f"{row.accuracy:.4f}" if row.accuracy is not None else "-"
        print(
            f"{'*' if row.champion else ' '} {row.version:<{width}}  {accuracy:<8}  "
            f"{row.n if row.n is not None else '-':<11}  "
            f"{', '.join(row.class_names)} / {row.created_at}"
        )
    print(
        "\n* champion" if any(row.champion for row in rows) else "\nno champion yet: `headstart models promote VERSION`"
    )
    return 0


def build_parser(train_config: type | None = None) -> argparse.ArgumentParser:
    """The command line; `train`'s options are TrainConfig's (or `train_config`'s), one each, and
    `predict`'s PredictConfig's."""
    from flows.parameters import add_config_options
    from headstart.config import PredictConfig, TrainConfig

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
    train.set_defaults(handler=_train)

    evaluate = commands.add_parser("evaluate", help="measure a trained run on a labelled folder")
    evaluate.add_argument("--model", required=True, help="a run directory written by 'headstart train'")
    evaluate.add_argument("--data", required=True, help="a folder with sub-folders named like the model's classes")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.add_argument("--batch-size", type=int, default=64)
    evaluate.set_defaults(handler=_evaluate)

    predict = commands.add_parser(
        "predict", help="label image files and folders with a trained model", argument_default=argparse.SUPPRESS
    )
    add_config_options(predict, PredictConfig, positional=("inputs",))
    predict.add_argument("--json", action="store_true", default=False, help="print one JSON object per image")
    predict.set_defaults(handler=_predict)

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
    from pydantic import ValidationError

    from headstart.errors import first_line

    if isinstance(error, ValidationError):
        return "; ".join(_invalid_option(e) for e in error.errors())
    return first_line(error)


def _invalid_option(detail: dict) -> str:
    """One invalid value as the command line knows it: `--seed -1: ...` rather than `head.seed: ...`."""
    from headstart.config import TrainConfig

    location = tuple(map(str, detail["loc"]))
    sections = TrainConfig.model_fields
    if len(location) == 2 and location[0] in sections:  # a section's field: its flat name
        field = sections[location[0]].annotation.model_fields.get(location[1])
        location = (field.alias or location[1],) if field is not None else location
    message = detail["msg"].removeprefix("Value error, ")
    if len(location) == 1 and detail["type"] not in ("missing", "extra_forbidden"):
        given = detail.get("input")
        shown = f" {given!r}" if isinstance(given, str) else f" {given}" if isinstance(given, (int, float)) else ""
        return f"--{location[0].replace('_', '-')}{shown}: {message}"
    return f"{'.'.join(location) or 'config'}: {message}"


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
    except OSError as error:
        fault = file_system_fault(error)
        if fault is None:  # not one the user can fix: a bug, whose traceback is wanted
            raise
        print(f"headstart: error: {fault}", file=sys.stderr)
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
