"""The int8 extraction engine and the .tflite exports, measured side by side in one run.

    uv run python benchmarks/edge.py [--data ../shared/datasets/cifar10-catdog] [--quick]

Prints a markdown table and writes benchmarks/results/edge.json (quick-edge.json with --quick).

1. Extraction throughput of headstart's TensorFlow engine, its float32 LiteRT engine and the
   litert-int8 engine (the backbone quantized on 200 of the data's images) at several image
   sizes: the same 64 images, enlarged to the size, through each; the engines take turns three
   times and each reports its median rate.
2. What int8 features cost: two cold `headstart train` runs on the same images, split and
   settings, one with the default engine (float32 LiteRT) and one with litert-int8, reporting to
   one Prefect server started here: test accuracy, validation accuracy of the epoch kept, wall time.
3. `headstart export` of the float run, float32 and int8: file size, largest probability
   difference from the Keras model, top-1 agreement and accuracy on the run's test split.
4. `headstart predict` of one image through the exported .tflite file and through the run
   itself: wall time of the whole command (median of three), and whether TensorFlow was imported.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT / "benchmarks"))
sys.path.insert(0, str(PROJECT))

import run as suite  # noqa: E402  (benchmarks/run.py: the Prefect server and `headstart train` runner)


def calibration_rows(data: Path, count: int = 200) -> list[dict]:
    files = sorted(path for path in data.rglob("*") if path.is_file())
    step = max(1, len(files) // count)
    return [
        {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "split": "train"}
        for path in files[::step][:count]
    ]


def throughput(data: Path, image_sizes: list[int], images: int, cache_dir: Path, rounds: int = 3) -> list[dict]:
    from headstart.backbone.handles import BUNDLED_HANDLE, resolve_backbone
    from headstart.data.images import load_image
    from headstart.data.preprocessing import resize_batch
    from headstart.edge import quantized_backbone
    from headstart.features.engines import KerasEngine, LiteRTEngine

    rows = []
    calibration = calibration_rows(data)
    sample = [load_image(Path(row["path"])).astype(np.float32) / 255.0 for row in calibration[:64]]
    for size in image_sizes:
        backbone = resolve_backbone(BUNDLED_HANDLE, size, cache_dir)
        batch = resize_batch(sample, size)
        threads = os.cpu_count() or 1
        engines = {
            "keras engine": KerasEngine(backbone),
            "litert": LiteRTEngine(backbone, cache_dir, threads),
            "litert-int8": LiteRTEngine(quantized_backbone(backbone, calibration, cache_dir), cache_dir, threads),
        }
        float_features = engines["litert"](batch)
        int8_features = engines["litert-int8"](batch)
        cosine = (
            (float_features * int8_features).sum(1)
            / np.linalg.norm(float_features, axis=1)
            / np.linalg.norm(int8_features, axis=1)
        )
        engines["keras engine"](batch)  # warm-up: tracing (the LiteRT engines warmed up above)
        rates = suite.take_turns(engines, batch, images, rounds)
        for name in engines:
            row = {
                "engine": name,
                "image_size": size,
                "images_per_second": float(np.median(rates[name])),
                "rounds": rates[name],
            }
            if name == "litert-int8":
                row["feature_cosine_to_float_mean"] = float(cosine.mean())
            rows.append(row)
            print(
                f"  {name:13s} {size:4d} px  {row['images_per_second']:7.1f} img/s "
                f"(median of {', '.join(f'{r:.0f}' for r in rates[name])})",
                flush=True,
            )
    return rows


def kept_validation_accuracy(run_dir: Path) -> float:
    """Validation accuracy of the epoch training kept (early stopping restores the lowest validation loss)."""
    history = json.loads((run_dir / "history.json").read_text())
    return float(history["val_accuracy"][int(np.argmin(history["val_loss"]))])


def cli(*arguments: str, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", *arguments], cwd=PROJECT, env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(f"headstart {arguments[0]} failed: {result.stderr[-2000:]}")
    return result


def predict_start_up(model: str, image: Path, cache_dir: Path, repeats: int = 3) -> dict:
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        cli("predict", "--model", model, "--cache-dir", str(cache_dir), str(image))
        seconds.append(time.perf_counter() - start)
    probe = (
        "import sys; from flows.cli import main; "
        "main(['predict', '--model', sys.argv[1], '--cache-dir', sys.argv[2], sys.argv[3]]); "
        "print('tensorflow imported:', 'tensorflow' in sys.modules)"
    )
    imported = subprocess.run(
        [sys.executable, "-c", probe, model, str(cache_dir), str(image)], cwd=PROJECT, capture_output=True, text=True
    ).stdout
    return {
        "seconds_median": statistics.median(seconds),
        "seconds": seconds,
        "tensorflow_imported": "tensorflow imported: True" in imported,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=PROJECT.parent / "shared" / "datasets" / "cifar10-catdog")
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--throughput-sizes", default="96,128,160,224")
    parser.add_argument("--quick", action="store_true", help="few images, for checking the script itself")
    args = parser.parse_args()
    sizes = [int(size) for size in args.throughput_sizes.split(",")]
    results: dict = {
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT, capture_output=True, text=True
        ).stdout.strip(),
        "cpus": os.cpu_count(),
        "image_size": args.image_size,
    }
    with tempfile.TemporaryDirectory(prefix="headstart-edge-") as scratch:
        work = Path(scratch)
        data = suite.make_folder(args.data, work / "data", 400) if args.quick else args.data
        suite.warm_up(data)
        print("extraction throughput", flush=True)
        results["throughput"] = throughput(
            data, [96] if args.quick else sizes, 64 if args.quick else 512, work / "throughput-cache"
        )
        server, suite.PREFECT_API_URL = suite.start_prefect_server(work / "prefect-home")
        try:
            trained = {}
            for engine in ("auto", "litert-int8"):
                print(f"cold train, engine {engine}", flush=True)
                run = suite.run_train(
                    data, work / f"train-{engine}", args.image_size, 30, ("--engine", engine, "--no-gate")
                )
                run["validation_accuracy"] = kept_validation_accuracy(Path(run["run_dir"]))
                trained[engine] = run
                print(
                    f"  {run['seconds']:.1f} s, test accuracy {run['accuracy']:.4f}, "
                    f"validation {run['validation_accuracy']:.4f}",
                    flush=True,
                )
            results["train"] = trained
            float_run = trained["auto"]["run_dir"]
            exports = {}
            for quantize in ("none", "int8"):
                print(f"export, quantize {quantize}", flush=True)
                start = time.perf_counter()
                output = (
                    cli(
                        "export",
                        "--model",
                        float_run,
                        "--quantize",
                        quantize,
                        "--cache-dir",
                        trained["auto"]["cache_dir"],
                    )
                    .stdout.strip()
                    .splitlines()[-1]
                )
                seconds = time.perf_counter() - start
                metrics = json.loads((Path(float_run) / "metrics.json").read_text())
                exports[quantize] = {**metrics["exports"][quantize], "seconds": seconds, "path": output}
            results["exports"] = exports
            image = next(path for path in sorted(data.rglob("*")) if path.is_file())
            results["predict"] = {
                "tflite": predict_start_up(exports["none"]["path"], image, Path(trained["auto"]["cache_dir"])),
                "run": predict_start_up(float_run, image, Path(trained["auto"]["cache_dir"])),
            }
        finally:
            server.terminate()
            server.wait(timeout=30)
    report(results, "quick-edge.json" if args.quick else "edge.json")


def report(results: dict, file_name: str) -> None:
    lines = [f"| measurement ({results['cpus']} cores, commit {results['commit']}) | value |", "|---|---|"]
    by_engine = {(row["engine"], row["image_size"]): row for row in results["throughput"]}
    for size in sorted({row["image_size"] for row in results["throughput"]}):
        for engine in ("keras engine", "litert", "litert-int8"):
            lines.append(
                f"| extraction, {engine}, {size} px | {by_engine[engine, size]['images_per_second']:.0f} img/s |"
            )
        int8_speed_up = (
            by_engine["litert-int8", size]["images_per_second"] / by_engine["litert", size]["images_per_second"]
        )
        lines.append(f"| litert-int8 / litert at {size} px | {int8_speed_up:.2f}× |")
        lines.append(
            f"| int8 features: mean cosine similarity to float32 ones, {size} px | "
            f"{by_engine['litert-int8', size]['feature_cosine_to_float_mean']:.3f} |"
        )
    for engine, run in results["train"].items():
        name = "float32 LiteRT (auto)" if engine == "auto" else engine
        lines.append(
            f"| cold `train`, {name}, {results['image_size']} px: wall time, test / validation accuracy | "
            f"{run['seconds']:.1f} s, {run['accuracy']:.4f} / {run['validation_accuracy']:.4f} |"
        )
    for quantize, record in results["exports"].items():
        lines.append(
            f"| export {'int8' if quantize == 'int8' else 'float32'}: "
            "size, max \\|Δp\\|, top-1 agreement, accuracy (Keras) | "
            f"{record['bytes'] / 2**20:.1f} MiB, {record['max_probability_difference']:.1e}, "
            f"{record['top1_agreement']:.2%}, "
            f"{record['accuracy']:.4f} ({record['keras_accuracy']:.4f}) |"
        )
    for name, measured in results["predict"].items():
        lines.append(
            f"| `headstart predict` of one image through the {'.tflite file' if name == 'tflite' else 'run'}: "
            "wall time, TensorFlow imported | "
            f"{measured['seconds_median']:.2f} s, {'yes' if measured['tensorflow_imported'] else 'no'} |"
        )
    print("\n".join(lines))
    (suite.RESULTS / file_name).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
