"""Each speed trick of the core against the waits it targets, with and without it, in one run.

    uv run python benchmarks/speed_tricks.py [--repeats 3] [--only first,predict-one,...]
        [--cifar ../shared/datasets/cifar10-catdog] [--cifar-cache DIR]

A user waits for: the demo command's first run (`headstart train --data examples/cats-vs-dogs`,
empty cache), its repeat run (everything cached, the earlier run reused) with no Prefect server
running (Prefect starts a temporary one) and with one running (`headstart server start`), and a
predict of one image and of a folder. Each wait is timed as a user sees it: the command's wall
time, from a fresh process.

A trick is switched off in the measured process only, by this script, so the product keeps no knob
for it: the command runs under this file's `--cli` mode, which patches each module it names just
after that module is imported (import order and timing are left as they are), then runs the
command as `headstart` does. Switching off `os-exit` runs `sys.exit(main())` in place of `run()`.
Per scenario the configurations (every trick on, then each trick off) take turns within each
round, their order rotated from round to round, so that load from elsewhere on the machine falls
on all of them alike; each reports its median and spread.

`--head` compares the head trainers on the real data: the current trainer and `train_head_fit`
(Keras `fit` with `EarlyStopping`), each in a full `headstart train --no-reuse` on cached
features, taking turns; test accuracy from the run's metrics, the trainer's own time measured
around it in the process.

Writes benchmarks/results/speed-tricks.json (raw) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
RESULTS = PROJECT / "benchmarks" / "results"
DEMO = PROJECT / "examples" / "cats-vs-dogs"
PYTHON = sys.executable

STARTED = time.perf_counter()

# Where the measured process reports what it timed (the trainer's seconds, child-process calls).
REPORT_VARIABLE = "HEADSTART_SPEED_TRICKS_REPORT"


# --- switching tricks off in the measured process ----------------------------------------------


def _report(key: str, value) -> None:
    path = os.environ.get(REPORT_VARIABLE)
    if not path:
        return
    with open(path, "a") as handle:
        handle.write(json.dumps({key: value}) + "\n")


def _no_child_process(module) -> None:
    # Returning None is the child's own failure path: this process then extracts the shard itself.
    module._extract_shard_in_child = lambda *args, **kwargs: None


def _count_child_processes(module) -> None:
    if not hasattr(module, "_extract_shard_in_child"):
        return
    original = module._extract_shard_in_child

    def counted(*args, **kwargs):
        result = original(*args, **kwargs)
        _report("child_process_shards", int(result is not None))
        return result

    module._extract_shard_in_child = counted


def _no_background_load(module) -> None:
    module.ExtractionContext.load_keras_layer_in_background = lambda self, backbone: None


def _no_background_import(module) -> None:
    module._import_in_background = lambda name: None


def _no_malloc_trim(module) -> None:
    module.release_freed_memory = lambda: None


def _plain_realpath(module) -> None:
    module.real_paths = lambda paths: [os.path.realpath(path) for path in paths]


def _keras3_not_blocked(module) -> None:
    if sys.modules.get("keras.saving.legacy.saved_model", 0) is None:
        del sys.modules["keras.saving.legacy.saved_model"]


def _timed_trainer(module, trainer=None) -> None:
    trainer = trainer or module.train_head

    def timed(*args, **kwargs):
        start = time.perf_counter()
        history = trainer(*args, **kwargs)
        _report("train_head_seconds", time.perf_counter() - start)
        _report("train_head_epochs", len(history["loss"]))
        return history

    module.train_head = timed


def _fit_trainer(module) -> None:
    _timed_trainer(module, train_head_fit)


def _streamed_features(module) -> None:
    trainer = module.train_head
    module.train_head = lambda *args, **kwargs: trainer(*args, **{**kwargs, "resident_bytes": 0})


def _timed_handlers(module) -> None:
    """Reports when the command's work is done, before the exit: Prefect's shutdown rounds the
    wall time to whole seconds or so, which hides smaller differences."""
    for name in ("_train", "_predict"):
        handler = getattr(module, name)

        def timed(args, handler=handler):
            status = handler(args)
            _report("work_seconds", time.perf_counter() - STARTED)
            return status

        setattr(module, name, timed)


# trick name → (module, patch applied right after that module is imported)
SWITCHES = {
    "child-process": ("headstart.features.extraction", _no_child_process),
    "background-load": ("headstart.features.extraction", _no_background_load),
    "background-import": ("flows.train", _no_background_import),
    "malloc-trim": ("headstart.features.extraction", _no_malloc_trim),
    "realpath": ("headstart.data.manifest", _plain_realpath),
    "keras3-import-blocked": ("headstart.infra.keras", _keras3_not_blocked),
    "while-loop-trainer": ("headstart.training.head", _fit_trainer),
    "resident-features": ("headstart.training.head", _streamed_features),
}
# Switched off by the environment (a variable TensorFlow itself reads, respected by headstart) or
# by how the command is started.
ENVIRONMENT_SWITCHES = {"legacy-keras-only": {"TF_USE_LEGACY_KERAS": "0"}}
OTHER_SWITCHES = {"os-exit"}
# Where each trick lives: one whose code is gone (removed after it was measured) is not measured again.
MARKERS = {
    "child-process": ("headstart/features/extraction.py", "def _extract_shard_in_child"),
    "background-load": ("headstart/features/extraction.py", "def load_keras_layer_in_background"),
    "background-import": ("flows/train.py", "def _import_in_background"),
    "malloc-trim": ("headstart/infra/storage.py", "malloc_trim"),
    "realpath": ("headstart/data/manifest.py", "def real_paths"),
    "keras3-import-blocked": ("headstart/infra/keras.py", '"keras.saving.legacy.saved_model", None'),
    "legacy-keras-only": ("headstart/infra/keras.py", "TF_USE_LEGACY_KERAS"),
    "os-exit": ("flows/cli.py", "os._exit"),
    "while-loop-trainer": ("headstart/training/head.py", "tf.while_loop"),
    "resident-features": ("headstart/training/head.py", "RESIDENT_FEATURE_BYTES"),
}


def present(tricks: list[str]) -> list[str]:
    return [name for name in tricks if MARKERS[name][1] in (PROJECT / MARKERS[name][0]).read_text()]


ALWAYS = [
    ("flows.cli", _timed_handlers),
    ("headstart.features.extraction", _count_child_processes),
    ("headstart.training.head", _timed_trainer),
]


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs patches on a module right after it is executed, wherever and whenever it is imported."""

    def __init__(self, patches: dict[str, list]):
        self.patches = patches

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.patches:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        loader, patches = spec.loader, self.patches.pop(fullname)

        class Patched(importlib.abc.Loader):
            def create_module(self, spec):
                return loader.create_module(spec)

            def exec_module(self, module):
                loader.exec_module(module)
                for patch in patches:
                    patch(module)

        spec.loader = Patched()
        return spec


def run_cli(without: list[str], argv: list[str]) -> None:
    """The `headstart` command with the named tricks off."""
    unknown = set(without) - set(SWITCHES) - set(ENVIRONMENT_SWITCHES) - OTHER_SWITCHES
    if unknown:
        sys.exit(f"unknown tricks: {sorted(unknown)}")
    patches: dict[str, list] = {}
    for module, patch in [*(SWITCHES[name] for name in without if name in SWITCHES), *ALWAYS]:
        if module == "headstart.training.head" and patch is _timed_trainer and "while-loop-trainer" in without:
            continue
        patches.setdefault(module, []).append(patch)
    sys.meta_path.insert(0, _AfterImport(patches))
    sys.argv = ["headstart", *argv]
    from flows import cli

    if "os-exit" in without:
        sys.exit(cli.main())
    cli.run()


# --- the head trained by Keras `fit` -----------------------------------------------------------


def train_head_fit(
    classifier,
    train,
    validation,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    patience: int,
    seed: int,
    on_epoch=None,
    resident_bytes: int | None = None,
) -> dict[str, list[float]]:
    """`headstart.training.head.train_head` by Keras `fit`: the same mini-batches in the same order
    each epoch (the splits' own seeded shuffle, fed through tf.data), Adam, early stopping on the
    validation loss with the best epoch's weights restored."""
    import itertools

    from headstart.features.streams import InMemoryFeatures
    from headstart.infra.keras import keras, tf
    from headstart.training import head as trainer

    def small_in_memory(split):  # as the trainer did while it kept small splits in memory
        if isinstance(split, tuple):
            return InMemoryFeatures(*split)
        if resident_bytes is not None and hasattr(split, "kept_in_memory"):
            return split.kept_in_memory(resident_bytes)
        return split

    if resident_bytes is None and hasattr(trainer, "RESIDENT_FEATURE_BYTES"):
        resident_bytes = trainer.RESIDENT_FEATURE_BYTES
    train, validation = small_in_memory(train), small_in_memory(validation)
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    feature_dim = int(classifier.get_layer(trainer.HEAD_DENSE).input_shape[-1])
    head = trainer.head_model(classifier, feature_dim)
    head.compile(keras.optimizers.Adam(learning_rate), keras.losses.SparseCategoricalCrossentropy(), ["accuracy"])
    spec = (tf.TensorSpec([None, feature_dim], tf.float32), tf.TensorSpec([None], tf.int64))
    epoch_numbers = itertools.count()

    def train_batches():  # tf.data calls it afresh for every epoch
        epoch = next(epoch_numbers)
        for features, labels in trainer._whole_batches(train.shuffled_chunks(seed, epoch), batch_size):
            for start in range(0, len(labels), batch_size):
                yield features[start : start + batch_size], labels[start : start + batch_size]

    def validation_batches():
        for features, labels in validation.chunks():
            for start in range(0, len(labels), 1024):
                yield features[start : start + 1024], labels[start : start + 1024]

    has_validation = validation is not None and validation.num_rows > 0
    callbacks = []
    if has_validation:
        callbacks.append(keras.callbacks.EarlyStopping("val_loss", patience=patience, restore_best_weights=True))
    if on_epoch is not None:
        seen: dict[str, list[float]] = {}

        def report(epoch, logs):
            for name, value in logs.items():
                seen.setdefault(name, []).append(float(value))
            on_epoch(epoch, seen)

        callbacks.append(keras.callbacks.LambdaCallback(on_epoch_end=report))
    fitted = head.fit(
        tf.data.Dataset.from_generator(train_batches, output_signature=spec),
        validation_data=(
            tf.data.Dataset.from_generator(validation_batches, output_signature=spec) if has_validation else None
        ),
        epochs=epochs,
        verbose=0,
        callbacks=callbacks,
    )
    return {name: [float(value) for value in values] for name, values in fitted.history.items()}


# --- measuring ---------------------------------------------------------------------------------


def start_prefect_server(home: Path) -> tuple[subprocess.Popen, str]:
    """A Prefect server as `headstart server start` keeps one: same command, its own home and port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    server = subprocess.Popen(
        [PYTHON, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api"
    for _ in range(360):
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return server, url
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise RuntimeError("the Prefect server did not start")


def timed_command(argv: list[str], without: list[str], env: dict, work: Path) -> dict:
    """Wall time of `headstart ARGV` with the named tricks off, and what the process reported."""
    work.mkdir(parents=True, exist_ok=True)
    report = work / f"report-{time.monotonic_ns()}.jsonl"
    env = {**env, REPORT_VARIABLE: str(report)}
    if BASELINE in without:  # the same command on another tree's code (the one before a change)
        without = [name for name in without if name != BASELINE]
        env["PYTHONPATH"] = str(BASELINE_TREE)
    for name in without:
        env.update(ENVIRONMENT_SWITCHES.get(name, {}))
    rss = report.with_suffix(".rss")
    command = [
        *(["/usr/bin/time", "-f", "%M", "-o", str(rss)] if Path("/usr/bin/time").exists() else []),
        PYTHON,
        str(Path(__file__).resolve()),
        "--cli",
        ",".join(without) or "-",
        "--",
        *argv,
    ]
    start, started_at = time.perf_counter(), time.time()
    result = subprocess.run(command, cwd=PROJECT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} without {without} failed:\n{result.stderr[-3000:]}")
    reported: dict = {}
    if report.exists():
        for line in report.read_text().splitlines():
            for key, value in json.loads(line).items():
                reported[key] = reported.get(key, 0) + value if key == "child_process_shards" else value
        report.unlink()
    last_print = _flow_last_print(result.stderr, started_at)
    if last_print is not None:
        reported["flow_printed_seconds"] = last_print
    if rss.exists():
        reported["peak_rss_mb"] = int(rss.read_text().split()[-1]) / 1024
        rss.unlink()
    return {"seconds": seconds, "stdout": result.stdout.strip().splitlines()[-1:] or [""], **reported}


def _flow_last_print(stderr: str, started_at: float) -> float | None:
    """Seconds from the command's start to the flow's last line ("headstart: test accuracy …" or
    "… nothing trained …"), from its log timestamp: the flow's work, before Prefect finishes the
    run, which rounds the wall time to about whole seconds."""
    import datetime
    import re

    stamps = re.findall(r"^(\d\d:\d\d:\d\d\.\d{3}) \| INFO +\| Flow run '[^']*' - headstart: ", stderr, re.MULTILINE)
    if not stamps:
        return None
    day = datetime.datetime.fromtimestamp(started_at)
    clock = datetime.datetime.strptime(stamps[-1], "%H:%M:%S.%f").time()
    printed = datetime.datetime.combine(day.date(), clock)
    return (printed - day).total_seconds() % 86400


def summary(runs: list[dict]) -> dict:
    seconds = [run["seconds"] for run in runs]
    result = {"median": statistics.median(seconds), "min": min(seconds), "max": max(seconds), "seconds": seconds}
    for key in ("work_seconds", "flow_printed_seconds"):
        values = [run[key] for run in runs if key in run]
        if len(values) == len(runs):
            name = key.removesuffix("_seconds")
            result |= {
                f"{name}_median": statistics.median(values),
                f"{name}_min": min(values),
                f"{name}_max": max(values),
            }
    return result


# A configuration that runs every trick on, on the code of BASELINE_TREE (`--baseline-tree`).
BASELINE = "@baseline"
BASELINE_TREE: Path | None = None


def with_baseline(configurations: dict[str, list[str]]) -> dict[str, list[str]]:
    if BASELINE_TREE is None:
        return configurations
    return {f"code at {BASELINE_TREE.name}": [BASELINE], **configurations}


def take_turns(configurations: dict[str, list[str]], repeats: int, measure) -> dict[str, list[dict]]:
    """Each configuration measured `repeats` times, all of them once per round, the order rotated."""
    names = list(configurations)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for round_number in range(repeats):
        shift = round_number % len(names)
        for name in names[shift:] + names[:shift]:
            run = measure(configurations[name])
            runs[name].append(run)
            print(f"    {name:24s} {run['seconds']:6.2f} s", flush=True)
    return runs


def scenario_train(data: Path, work: Path, env: dict, tricks: list[str], repeats: int, cache: str) -> dict:
    """`headstart train --data DATA` on a cache that is: "empty" each time (a first run); "models"
    each time, holding the backbone and its LiteRT conversion but no features (a first run on new
    images, where the child process can act); or "everything", that of one earlier run (a repeat)."""
    counter = iter(range(10**6))
    reference = work / "reference"
    if cache != "empty":
        timed_command(train_argv(data, reference), [], env, work)
    tricks = present(tricks)
    configurations = {"all tricks on": [], **{f"without {name}": [name] for name in tricks}}

    def measure(without: list[str]) -> dict:
        if cache == "everything":
            return timed_command(train_argv(data, reference), without, env, work)
        place = work / f"run-{next(counter)}"
        if cache == "models":
            for models in ("backbones", "litert"):
                shutil.copytree(reference / "cache" / models, place / "cache" / models)
        return timed_command(train_argv(data, place), without, env, work)

    runs = take_turns(with_baseline(configurations), repeats, measure)
    return {name: {**summary(attempts), "runs": attempts} for name, attempts in runs.items()}


def train_argv(data: Path, place: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--data",
        str(data),
        "--cache-dir",
        str(place / "cache"),
        "--artifacts-root",
        str(place / "artifacts"),
        *extra,
    ]


def scenario_predict(paths: list[Path], work: Path, env: dict, tricks: list[str], repeats: int) -> dict:
    place = work / "predict-model"
    if not (place / "artifacts").exists():
        timed_command(train_argv(DEMO, place), [], env, work)
    run_dir = sorted(path for path in (place / "artifacts").iterdir() if path.is_dir() and path.name[0].isdigit())[-1]
    argv = [
        "predict",
        "--model",
        str(run_dir),
        "--cache-dir",
        str(place / "cache"),
        "--output",
        str(work / "predictions.csv"),
        *map(str, paths),
    ]
    configurations = {"all tricks on": [], **{f"without {name}": [name] for name in present(tricks)}}
    runs = take_turns(with_baseline(configurations), repeats, lambda without: timed_command(argv, without, env, work))
    return {name: {**summary(runs), "runs": runs} for name, runs in runs.items()}


def scenario_head(data: Path, cache_dir: Path, work: Path, env: dict, repeats: int) -> dict:
    """Both head trainers in full `train --no-reuse` runs on cached features: time and test accuracy."""
    timed_command(train_argv(data, work / "head-warm", "--no-gate", "--cache-dir", str(cache_dir)), [], env, work)

    def measure(without: list[str]) -> dict:
        place = work / "head-runs"
        run = timed_command(
            train_argv(data, place, "--no-reuse", "--no-gate", "--cache-dir", str(cache_dir)), without, env, work
        )
        metrics = json.loads((Path(run["stdout"][0]) / "metrics.json").read_text())
        return {**run, "accuracy": metrics["accuracy"], "n": metrics["n"]}

    configurations = {"while_loop trainer (current)": [], "Keras fit": ["while-loop-trainer"]}
    if present(["resident-features"]):
        configurations["while_loop trainer, features streamed"] = ["resident-features"]
    runs = take_turns(configurations, repeats, measure)
    result = {}
    for name, attempts in runs.items():
        trainer_seconds = [run["train_head_seconds"] for run in attempts]
        result[name] = {
            **summary(attempts),
            "trainer_median": statistics.median(trainer_seconds),
            "trainer_min": min(trainer_seconds),
            "trainer_max": max(trainer_seconds),
            "accuracies": sorted({run["accuracy"] for run in attempts}),
            "epochs": sorted({run["train_head_epochs"] for run in attempts}),
            "runs": attempts,
        }
    return result


def load_snapshot() -> str:
    try:
        return open("/proc/loadavg").read().split()[0]
    except OSError:
        return "?"


FIRST_RUN_TRICKS = [
    "child-process",
    "background-load",
    "background-import",
    "malloc-trim",
    "realpath",
    "os-exit",
    "legacy-keras-only",
    "keras3-import-blocked",
    "while-loop-trainer",
]
NEW_IMAGES_TRICKS = ["child-process", "background-load", "background-import"]
REPEAT_TRICKS = ["realpath", "os-exit", "legacy-keras-only", "keras3-import-blocked"]
PREDICT_TRICKS = ["os-exit", "legacy-keras-only", "keras3-import-blocked"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default="first,repeat-temporary-server,repeat-server,predict-one,predict-folder,head")
    parser.add_argument("--cifar", type=Path, default=PROJECT.parent / "shared" / "datasets" / "cifar10-catdog")
    parser.add_argument("--cifar-cache", type=Path, help="a cache holding the CIFAR features (extracted if absent)")
    parser.add_argument("--output", type=Path, default=RESULTS / "speed-tricks.json")
    parser.add_argument(
        "--baseline-tree",
        type=Path,
        help="a checkout of the code before a change: its command is measured too, taking turns with this one's",
    )
    parser.add_argument("--tricks", help="measure only these tricks (comma-separated)")
    args = parser.parse_args()
    global BASELINE_TREE
    BASELINE_TREE = args.baseline_tree.resolve() if args.baseline_tree else None
    if args.tricks:
        for tricks in (FIRST_RUN_TRICKS, NEW_IMAGES_TRICKS, REPEAT_TRICKS, PREDICT_TRICKS):
            tricks[:] = [name for name in tricks if name in args.tricks.split(",")]
    wanted = args.only.split(",")
    work = Path(tempfile.mkdtemp(prefix="headstart-speed-tricks-"))
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    env.pop("PREFECT_API_URL", None)
    env_temporary = {**env, "PREFECT_HOME": str(work / "prefect-home-temporary")}
    results: dict = json.loads(args.output.read_text()) if args.output.exists() else {}
    results.setdefault("scenarios", {})
    results["machine"] = {"cores": os.cpu_count()}
    results["repeats"] = args.repeats
    server, url = start_prefect_server(work / "prefect-home-server")
    env_server = {**env, "PREFECT_HOME": str(work / "prefect-home-server"), "PREFECT_API_URL": url}
    try:
        # One-time costs (bytecode, the images' first read, the temporary server's database) before any timing.
        timed_command(train_argv(DEMO, work / "warm-up"), [], env_temporary, work)
        scenarios = {
            "first": lambda: scenario_train(DEMO, work / "first", env_server, FIRST_RUN_TRICKS, args.repeats, "empty"),
            "first-new-images": lambda: scenario_train(
                DEMO, work / "new-images", env_server, NEW_IMAGES_TRICKS, args.repeats, "models"
            ),
            "repeat-temporary-server": lambda: scenario_train(
                DEMO, work / "repeat-temporary", env_temporary, REPEAT_TRICKS, args.repeats, "everything"
            ),
            "repeat-server": lambda: scenario_train(
                DEMO, work / "repeat-server", env_server, REPEAT_TRICKS, args.repeats + 2, "everything"
            ),
            "predict-one": lambda: scenario_predict(
                [sorted((DEMO / "cat").iterdir())[0]], work, env_server, PREDICT_TRICKS, args.repeats + 2
            ),
            "predict-folder": lambda: scenario_predict(
                [DEMO / "cat"], work, env_server, PREDICT_TRICKS, args.repeats + 2
            ),
            "head": lambda: scenario_head(
                args.cifar, args.cifar_cache or work / "cifar-cache", work, env_server, args.repeats
            ),
        }
        for name in wanted:
            print(f"{name} (load average {load_snapshot()}) …", flush=True)
            started = time.time()
            results["scenarios"][name] = {
                "configurations": scenarios[name](),
                "started": time.strftime("%Y-%m-%d %H:%M", time.localtime(started)),
                "load_average_before": load_snapshot(),
            }
            args.output.write_text(json.dumps(results, indent=2) + "\n")
    finally:
        os.killpg(server.pid, 15)
        server.wait()
        shutil.rmtree(work, ignore_errors=True)
    print(table(results))


def table(results: dict) -> str:
    lines = ["| scenario | configuration | median s | min–max s | saved by the trick |", "|---|---|---|---|---|"]
    for scenario, measured in results["scenarios"].items():
        configurations = measured["configurations"]
        reference = configurations.get("all tricks on") or configurations.get("while_loop trainer (current)")
        for name, values in configurations.items():
            saved = values["median"] - reference["median"]
            lines.append(
                f"| {scenario} | {name} | {values['median']:.2f} | {values['min']:.2f}–{values['max']:.2f} | "
                f"{saved:+.2f} s ({saved / values['median']:+.1%}) |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--cli":
        separator = sys.argv.index("--")
        run_cli([name for name in sys.argv[2].split(",") if name not in ("", "-")], sys.argv[separator + 1 :])
    else:
        main()
