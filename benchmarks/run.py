"""headstart against the straightforward pipeline, and its own costs, measured in one run.

    uv run python benchmarks/run.py [--data ../shared/datasets/cifar10-catdog] [--quick]

Prints a markdown table and writes benchmarks/results/latest.json (quick.json with --quick, so
that checking the script never replaces a real measurement). Ratios are measured inside
one run of this script, one after the other, because absolute times on a shared machine drift.

1. Seed-style baseline vs headstart: the baseline decodes and resizes every image into memory
   and calls `model.fit` on the Functional model with the frozen `hub.KerasLayer`, so the
   backbone runs on every image in every epoch. headstart: a cold `headstart train` (empty cache)
   on the same images, split, image size and epochs. Wall time and test accuracy of each.
Every `headstart train` reports to one Prefect server started here, as in a deployment.

2. Extraction throughput of each engine at several image sizes.
3. A warm re-run (identical inputs) and a +10 %-data re-run, as fractions of the cold run. The
   +10 % run starts from a cache of 10/11 of the images and ends on exactly the cold run's
   images, so both runs produce the same model. The cold, warm and +10 % runs are each made
   `--repeats` times (3) and report their median: a burst of load from elsewhere on the machine
   then moves one attempt, not the ratio.
4. Peak RSS of a cold `headstart train` against dataset size (larger sets are made by
   re-encoding the images with one pixel changed, so that every file has new content).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parents[1]
RESULTS = PROJECT / "benchmarks" / "results"


def start_prefect_server(home: Path) -> tuple[subprocess.Popen, str]:
    """A Prefect server for every run, as deployments and scheduled retraining have one."""
    import socket
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/api"
    for _ in range(180):
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return server, url
        except OSError:
            time.sleep(1)
    server.kill()
    raise RuntimeError("the Prefect server did not start")


PREFECT_API_URL = ""


def run_train(data: Path, work: Path, image_size: int, epochs: int, extra: tuple[str, ...] = ()) -> dict:
    """Runs `headstart train` as a user would; returns wall time, peak RSS and the run's metrics."""
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL}
    command = [
        "/usr/bin/time",
        "-f",
        "%M",
        "-o",
        str(work / "rss.txt"),
        sys.executable,
        "-m",
        "flows.cli",
        "train",
        "--data",
        str(data),
        "--image-size",
        str(image_size),
        "--epochs",
        str(epochs),
        "--artifacts-root",
        str(work / "artifacts"),
        "--cache-dir",
        str(work / "cache"),
        *extra,
    ]
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = subprocess.run(command, cwd=PROJECT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"headstart train failed: {result.stderr[-2000:]}")
    run_dir = Path(result.stdout.strip().splitlines()[-1])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {
        "seconds": seconds,
        "peak_rss_mb": int((work / "rss.txt").read_text().split()[-1]) / 1024,
        "accuracy": metrics["accuracy"],
        "run_dir": str(run_dir),
        "cache_dir": str(work / "cache"),
    }


def median_run(runs: list[dict]) -> dict:
    """The run of median wall time (the lower middle one of an even count), with every attempt's time."""
    middle = sorted(runs, key=lambda run: run["seconds"])[(len(runs) - 1) // 2]
    return {**middle, "attempts_seconds": [run["seconds"] for run in runs]}


def _seconds(runs: list[dict]) -> str:
    return ", ".join(f"{run['seconds']:.1f}" for run in runs) + " s"


def baseline(manifest_path: Path, image_size: int, epochs: int, batch_size: int, seed: int) -> dict:
    """The straightforward pipeline: all images in memory, the full model fitted every epoch."""
    import pyarrow.parquet as pq

    from headstart.backbone.handles import BUNDLED_HANDLE, resolve_backbone
    from headstart.data.images import load_image
    from headstart.data.preprocessing import resize_images
    from headstart.infra.keras import hub, keras

    start = time.perf_counter()
    table = pq.read_table(manifest_path).to_pydict()

    def images_of(split):
        chosen = [i for i, s in enumerate(table["split"]) if s == split]
        pixels = np.stack(
            [
                resize_images(load_image(table["path"][i])[None].astype(np.float32) / 255.0, image_size)[0].numpy()
                for i in chosen
            ]
        )
        return pixels, np.array([table["label"][i] for i in chosen])

    train, validation, test = images_of("train"), images_of("validation"), images_of("test")
    backbone = resolve_backbone(BUNDLED_HANDLE, image_size, Path(tempfile.mkdtemp()))
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((image_size, image_size, 3))
    features = hub.KerasLayer(str(backbone.module_path), trainable=False)(inputs)
    outputs = keras.layers.Dense(int(max(table["label"])) + 1, activation="softmax")(
        keras.layers.Dropout(0.2)(features)
    )
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", ["accuracy"])
    model.fit(*train, validation_data=validation, epochs=epochs, batch_size=batch_size, verbose=0)
    accuracy = float(model.evaluate(*test, verbose=0)[1])
    return {"seconds": time.perf_counter() - start, "accuracy": accuracy, "train_images": int(len(train[1]))}


def throughput(image_sizes: list[int], images: int, cache_dir: Path, rounds: int = 3) -> list[dict]:
    """Forward passes per second on the same random batch: Keras `predict` (the reference),
    headstart's TensorFlow engine and its LiteRT engine.

    The engines take turns, `rounds` times, and each reports its median rate: on a shared
    machine a burst of load from elsewhere then lands on one measurement, not on one engine.
    """
    from headstart.backbone.handles import BUNDLED_HANDLE, resolve_backbone
    from headstart.features.engines import KerasEngine, LiteRTEngine
    from headstart.infra.keras import keras

    rows = []
    generator = np.random.default_rng(0)
    for size in image_sizes:
        backbone = resolve_backbone(BUNDLED_HANDLE, size, cache_dir)
        batch = generator.random((64, size, size, 3), dtype=np.float32)
        inputs = keras.Input((size, size, 3))
        predict_model = keras.Model(inputs, backbone.keras_layer()(inputs))
        engines = {
            "keras predict": lambda images: predict_model.predict(images, verbose=0),
            "keras engine": KerasEngine(backbone),
            "litert": LiteRTEngine(backbone, cache_dir, os.cpu_count() or 1),
        }
        for engine in engines.values():
            engine(batch)  # warm-up: tracing, allocation
        rates = take_turns(engines, batch, images, rounds)
        for name, engine in engines.items():
            row = {
                "engine": name,
                "image_size": size,
                "images_per_second": float(np.median(rates[name])),
                "rounds": rates[name],
            }
            if isinstance(engine, LiteRTEngine):
                row["max_difference_from_tensorflow"] = engine.parity
            rows.append(row)
            print(
                f"  {name:13s} {size:4d} px  {row['images_per_second']:7.1f} img/s "
                f"(median of {', '.join(f'{r:.0f}' for r in rates[name])})",
                flush=True,
            )
    return rows


def take_turns(engines: dict, batch, images: int, rounds: int) -> dict[str, list[float]]:
    """Images per second of each engine, running the batch until about `images` images have gone
    through it; the engines take turns, `rounds` times."""
    rates: dict[str, list[float]] = {name: [] for name in engines}
    repeats = max(1, images // len(batch))
    for _ in range(rounds):
        for name, engine in engines.items():
            start = time.perf_counter()
            for _ in range(repeats):
                engine(batch)
            rates[name].append(repeats * len(batch) / (time.perf_counter() - start))
    return rates


def warm_up(data: Path) -> None:
    """One-time costs of a fresh machine, paid before any timing: Python compiling the bytecode of
    every module a run imports (a fresh environment has none), and the images' first read from
    disk. Otherwise they would all land on whichever run comes first, here the cold `train`."""
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import flows.train, headstart.infra.keras, headstart.features.engines, headstart.training.head, "
            "headstart.reporting.plots, headstart.backbone.mobilenet, headstart.backbone.hub_module, "
            "tasks.evaluation, tasks.model, ai_edge_litert.interpreter, prefect_dask",
        ],
        cwd=PROJECT,
        check=True,
        capture_output=True,
    )
    for path in data.rglob("*"):
        if path.is_file():
            path.read_bytes()


def make_folder(source: Path, destination: Path, count: int, per_class_offset: int = 0) -> Path:
    """A class folder of `count` images: the source's, then re-encoded variants with new content."""
    from PIL import Image

    classes = sorted(p.name for p in source.iterdir() if p.is_dir())
    files = {name: sorted((source / name).iterdir()) for name in classes}
    per_class = count // len(classes)
    for name in classes:
        (destination / name).mkdir(parents=True, exist_ok=True)
        originals = files[name]
        for index in range(per_class_offset, per_class_offset + per_class):
            original = originals[index % len(originals)]
            target = (
                destination / name / (f"{index:06d}{original.suffix}" if index < len(originals) else f"{index:06d}.png")
            )
            if target.exists():
                continue
            if index < len(originals):
                os.symlink(original.resolve(), target)
            else:
                pixels = np.asarray(Image.open(original).convert("RGB")).copy()
                pixels[index % pixels.shape[0], (index // pixels.shape[0]) % pixels.shape[1], index % 3] ^= (
                    1 + (index // len(originals)) % 255
                )
                Image.fromarray(pixels).save(target)
    return destination


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=PROJECT.parent / "shared" / "datasets" / "cifar10-catdog")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--throughput-sizes", default="96,128,160,224")
    parser.add_argument("--rss-sizes", default="2000,10000,50000")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs of each short `train` measurement; each reports its median"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, for checking the script itself")
    args = parser.parse_args()
    if not args.data.is_dir():
        sys.exit(f"benchmarks: data folder not found: {args.data}")
    if args.quick:
        args.rss_sizes, args.throughput_sizes, args.image_size, args.epochs, args.repeats = "200,400", "96", 96, 2, 2
    work = Path(tempfile.mkdtemp(prefix="headstart-bench-"))
    warm_up(args.data)
    global PREFECT_API_URL
    server, PREFECT_API_URL = start_prefect_server(work / "prefect-home")
    results: dict = {"machine": {"cores": os.cpu_count()}, "image_size": args.image_size, "epochs": args.epochs}
    total = sum(1 for _ in args.data.rglob("*") if _.is_file())
    results["images"] = total if not args.quick else 400
    data = args.data if not args.quick else make_folder(args.data, work / "quick-data", 400)
    try:
        print(f"cold headstart train, {args.repeats} times …", flush=True)
        colds = [
            run_train(data, work / f"cold-{attempt}", args.image_size, args.epochs, ("--engine", "auto"))
            for attempt in range(args.repeats)
        ]
        cold = results["headstart_cold"] = median_run(colds)
        print(
            f"  {_seconds(colds)}; median {cold['seconds']:.1f} s, accuracy {cold['accuracy']:.4f}, "
            f"peak RSS {cold['peak_rss_mb']:.0f} MB",
            flush=True,
        )
        warms = [run_train(data, work / "cold-0", args.image_size, args.epochs) for _ in range(args.repeats)]
        warm = results["headstart_warm"] = median_run(warms)
        print(f"  warm re-run {_seconds(warms)}; median {warm['seconds']:.1f} s", flush=True)

        print(f"+10 % data re-run, {args.repeats} times …", flush=True)
        everything = results["images"]
        subset_count = int(everything / 1.1)
        grown = make_folder(data, work / "grown", subset_count)
        base = run_train(grown, work / "grown-run", args.image_size, args.epochs)
        shutil.copytree(work / "grown-run" / "cache", work / "cache-before-adding")
        make_folder(data, grown, everything - subset_count, per_class_offset=subset_count // 2)
        added_runs = []
        for _ in range(args.repeats):
            # Each attempt starts from the cache as the run on 10/11 of the images left it.
            shutil.rmtree(work / "grown-run" / "cache")
            shutil.copytree(work / "cache-before-adding", work / "grown-run" / "cache")
            added_runs.append(run_train(grown, work / "grown-run", args.image_size, args.epochs))
        added = median_run(added_runs)
        results["headstart_plus_10_percent"] = {
            **added,
            "images_before": subset_count,
            "cold_seconds_before": base["seconds"],
        }
        print(
            f"  cold on {subset_count} images {base['seconds']:.1f} s; "
            f"after adding {everything - subset_count}: {_seconds(added_runs)}; median {added['seconds']:.1f} s",
            flush=True,
        )

        if not args.skip_baseline:
            print("seed-style baseline …", flush=True)
            manifest = sorted((work / "cold-0" / "cache" / "manifests").glob("*.parquet"), key=os.path.getmtime)[-1]
            code = (
                f"import json, sys; sys.path.insert(0, {str(PROJECT / 'benchmarks')!r}); import run; "
                f"print(json.dumps(run.baseline(__import__('pathlib').Path({str(manifest)!r}), "
                f"{args.image_size}, {args.epochs}, 64, 0)))"
            )
            start_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            output = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, capture_output=True, text=True)
            if output.returncode != 0:
                raise RuntimeError(output.stderr[-2000:])
            results["baseline"] = {
                **json.loads(output.stdout.strip().splitlines()[-1]),
                "peak_rss_mb": max(start_rss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024,
            }
            print(
                f"  {results['baseline']['seconds']:.1f} s, accuracy {results['baseline']['accuracy']:.4f}", flush=True
            )

        print("extraction throughput …", flush=True)
        results["throughput"] = throughput(
            [int(s) for s in args.throughput_sizes.split(",")],
            640 if not args.quick else 128,
            work / "throughput-cache",
        )

        print("peak RSS against dataset size …", flush=True)
        rss_rows = []
        for size in (int(s) for s in args.rss_sizes.split(",")):
            folder = make_folder(args.data, work / f"rss-data-{size}", size)
            measured = run_train(folder, work / f"rss-{size}", args.image_size, args.epochs)
            rss_rows.append({"images": size, "peak_rss_mb": measured["peak_rss_mb"], "seconds": measured["seconds"]})
            print(f"  {size:6d} images  {measured['peak_rss_mb']:.0f} MB  {measured['seconds']:.0f} s", flush=True)
            shutil.rmtree(work / f"rss-{size}" / "cache", ignore_errors=True)
        results["peak_rss"] = rss_rows
    finally:
        server.terminate()
        shutil.rmtree(work, ignore_errors=True)
    report(results, "quick.json" if args.quick else "latest.json")


def report(results: dict, file_name: str) -> None:
    cold, warm, added = results["headstart_cold"], results["headstart_warm"], results["headstart_plus_10_percent"]
    lines = [
        f"| measurement ({results['image_size']} px, {results['epochs']} epochs, "
        f"{results['machine']['cores']} cores) | value |",
        "|---|---|",
    ]
    if "baseline" in results:
        base = results["baseline"]
        lines += [
            f"| seed-style baseline: wall time, test accuracy | {base['seconds']:.1f} s, {base['accuracy']:.4f} |",
            f"| headstart cold `train`: wall time, test accuracy | {cold['seconds']:.1f} s, {cold['accuracy']:.4f} |",
            f"| speed-up over the baseline | {base['seconds'] / cold['seconds']:.1f}× |",
        ]
    lines += [
        f"| warm re-run / cold | {warm['seconds'] / cold['seconds']:.1%} ({warm['seconds']:.1f} s) |",
        f"| +10 % data re-run / cold run (both end on the same {results['images']} images) | "
        f"{added['seconds'] / cold['seconds']:.1%} ({added['seconds']:.1f} s) |",
        f"| (cold run on the {added['images_before']} images before adding) | {added['cold_seconds_before']:.1f} s |",
    ]
    for row in results["throughput"]:
        lines.append(f"| extraction, {row['engine']}, {row['image_size']} px | {row['images_per_second']:.0f} img/s |")
        if "max_difference_from_tensorflow" in row:
            lines.append(
                f"| LiteRT parity with TensorFlow (max abs difference), {row['image_size']} px | "
                f"{row['max_difference_from_tensorflow']:.1e} |"
            )
    by_size = {(r["engine"], r["image_size"]): r["images_per_second"] for r in results["throughput"]}
    for size in sorted({r["image_size"] for r in results["throughput"]}):
        if ("litert", size) in by_size and ("keras predict", size) in by_size:
            lines.append(
                f"| LiteRT / Keras predict at {size} px | "
                f"{by_size[('litert', size)] / by_size[('keras predict', size)]:.2f}× |"
            )
    for row in results["peak_rss"]:
        lines.append(f"| peak RSS, cold `train` on {row['images']} images | {row['peak_rss_mb']:.0f} MB |")
    table = "\n".join(lines)
    print("\n" + table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    from headstart.infra.storage import write_json_atomic

    write_json_atomic(RESULTS / file_name, {**results, "table": table})


if __name__ == "__main__":
    main()
