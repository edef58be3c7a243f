"""How far headstart's probabilities can be trusted, on ../shared/datasets/cifar10-catdog.

    uv run python benchmarks/trust.py [--cache-dir DIR] [--skip-fine-tune]

Each configuration is one `headstart train` (gate off, reuse off, a fresh artifacts root; the
feature cache shared, so only the first run extracts):

1. The default head, with --target-accuracy 0.97 and --export tflite: the test split's expected
   calibration error before and after temperature scaling, the threshold chosen on validation and
   its test coverage and accuracy, and the .tflite files' largest probability difference from the
   calibrated Keras model (their export checks).
2. The same with --fine-tune (the default fine-tuning settings).
3. Imbalance: every dog and one cat in ten (a folder of links, 10:1), trained with
   --class-weights none and auto: the cat class's recall, balanced accuracy and accuracy.
4. The sweep: the defaults and --sweep one after the other: the setting chosen, its test
   accuracy against the default head's, and the wall times (the run's, and the settings' sum).

--parts picks some (calibration, fine-tune, imbalance, sweep); the results of the others already
in trust.json are kept. Writes benchmarks/results/trust.md and trust.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
DATASET = PROJECT.parent / "shared" / "datasets" / "cifar10-catdog"
RESULTS = PROJECT / "benchmarks" / "results"


def train(work: Path, name: str, data: Path, cache: Path, *options: str) -> dict:
    """One `headstart train`; its run's metrics (and exports record), with its wall time."""
    root = work / name
    command = [sys.executable, "-m", "flows.cli", "train", "--data", str(data), "--cache-dir", str(cache)]
    command += ["--artifacts-root", str(root), "--no-gate", "--no-reuse", *options]
    started = time.monotonic()
    done = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    (run,) = [path for path in root.iterdir() if path.is_dir() and not path.name.startswith((".", "registry"))]
    metrics = json.loads((run / "metrics.json").read_text())
    return {"name": name, "options": list(options), "seconds": round(seconds, 1), "metrics": metrics}


def imbalanced_folder(work: Path, ratio: int = 10) -> Path:
    """Every dog, and every `ratio`-th cat (by file name), as links."""
    folder = work / "cats-1-to-10"
    for name in ("cat", "dog"):
        (folder / name).mkdir(parents=True)
        files = sorted((DATASET / name).iterdir())
        for file in files[::ratio] if name == "cat" else files:
            (folder / name / file.name).symlink_to(file)
    return folder


def calibration_row(result: dict) -> str:
    metrics = result["metrics"]
    calibration, unsure = metrics["calibration"], metrics["unsure"]
    at_target = (
        f"{unsure['threshold']:.4f} | {_row_for(unsure, 0.97)}" if unsure.get("threshold") is not None else "— | —"
    )
    return (
        f"| {result['name']} | {metrics['accuracy']:.4f} | {calibration['temperature']:.3f} | "
        f"{calibration['ece_before']:.4f} | {calibration['ece_after']:.4f} | "
        f"{calibration['validation_ece_before']:.4f} → {calibration['validation_ece_after']:.4f} | {at_target} |"
    )


def _row_for(unsure: dict, target: float) -> str:
    (row,) = [row for row in unsure["rows"] if row["target_accuracy"] == target]
    return f"{row['test_coverage']:.1%} | {row['test_accuracy']:.4f}"


def export_line(result: dict) -> str:
    """The .tflite files' largest probability difference from the calibrated Keras model, and their accuracy."""
    return "; ".join(
        f"{quantize}: max |Δ probability| {record['max_probability_difference']:.2g}, "
        f"top-1 agreement {record['top1_agreement']:.1%}, accuracy {record['accuracy']:.4f}"
        for quantize, record in result["metrics"].get("exports", {}).items()
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", type=Path, default=PROJECT / ".cache" / "headstart")
    parser.add_argument("--parts", default="calibration,fine-tune,imbalance,sweep")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT, capture_output=True, text=True)
    kept = RESULTS / "trust.json"
    results = json.loads(kept.read_text()) if kept.is_file() else []
    with tempfile.TemporaryDirectory(prefix="trust-") as temporary:
        work = Path(temporary)
        os.environ.setdefault("PREFECT_HOME", str(work / "prefect"))
        cache, new = args.cache_dir, []
        if "calibration" in parts:
            new.append(train(work, "default head", DATASET, cache, "--target-accuracy", "0.97", "--export", "tflite"))
        if "fine-tune" in parts:
            new.append(train(work, "fine-tuned", DATASET, cache, "--target-accuracy", "0.97", "--fine-tune"))
        if "imbalance" in parts:
            folder = imbalanced_folder(work)
            for setting in ("none", "auto"):
                new.append(train(work, f"1:10, class weights {setting}", folder, cache, "--class-weights", setting))
        if "sweep" in parts:
            new.append(train(work, "defaults, for the sweep", DATASET, cache))
            new.append(train(work, "sweep", DATASET, cache, "--sweep"))
    for result in new:
        result["commit"] = commit.stdout.strip()
    names = {result["name"] for result in new}
    results = [result for result in results if result["name"] not in names] + new
    commits = sorted({result.get("commit", "?") for result in results})
    lines = [
        "# Trust: calibration, unsure, imbalance",
        "",
        f"`benchmarks/trust.py` at commit(s) {', '.join(commits)}, "
        f"last {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{platform.machine()}, {os.cpu_count()} cores; ../shared/datasets/cifar10-catdog (160 px, defaults).",
        "",
        "## Calibration and the unsure threshold (test split)",
        "",
        "| run | accuracy | temperature | ECE before | ECE after | validation ECE | threshold for 0.97 "
        "(validation) | test coverage | test accuracy |",
        "|---|---|---|---|---|---|---|---|---|",
        *(calibration_row(result) for result in results if "--target-accuracy" in result["options"]),
        "",
        "Coverage and accuracy on the test split of the thresholds chosen on validation:",
        "",
    ]
    for result in results:
        if "--target-accuracy" not in result["options"]:
            continue
        lines += [
            f"**{result['name']}**",
            "",
            "| target | threshold | test coverage | test accuracy |",
            "|---|---|---|---|",
        ]
        for row in result["metrics"]["unsure"]["rows"]:
            if row["threshold"] is None:
                lines.append(f"| {row['target_accuracy']} | not reached | | |")
            else:
                lines.append(
                    f"| {row['target_accuracy']} | {row['threshold']:.4f} | {row['test_coverage']:.1%} "
                    f"| {row['test_accuracy']:.4f} |"
                )
        lines.append("")
        if result["metrics"].get("exports"):
            lines += [f"Exports: {export_line(result)}", ""]
    lines += [
        "## Imbalance: one cat for ten dogs",
        "",
        "| run | cat recall | dog recall | balanced accuracy | accuracy | test images (cat, dog) | class weights |",
        "|---|---|---|---|---|---|---|",
    ]
    for result in results:
        if not result["name"].startswith("1:10"):
            continue
        metrics = result["metrics"]
        cat, dog = metrics["per_class"]["cat"], metrics["per_class"]["dog"]
        weights = metrics.get("class_weights")
        lines.append(
            f"| {result['name']} | {cat['recall']:.4f} | {dog['recall']:.4f} | {metrics['balanced_accuracy']:.4f} | "
            f"{metrics['accuracy']:.4f} | {cat['support']}, {dog['support']} | "
            + (", ".join(f"{name} {w:.3f}" for name, w in weights.items()) if weights else "—")
            + " |"
        )
    by_name = {result["name"]: result for result in results}
    if "sweep" in by_name:
        sweep, default = by_name["sweep"], by_name["defaults, for the sweep"]
        rows = sweep["metrics"]["sweep"]
        chosen = next(row for row in rows if row["chosen"])
        lines += [
            "",
            "## The sweep of the head",
            "",
            f"Chosen on validation: **{chosen['setting']}** (validation accuracy {chosen['validation_accuracy']:.4f}); "
            f"test accuracy **{sweep['metrics']['accuracy']:.4f}** against the default head's "
            f"{default['metrics']['accuracy']:.4f}. Wall time of the whole `train --sweep` {sweep['seconds']} s "
            "against "
            f"{default['seconds']} s for the defaults (one after the other, features cached); the {len(rows)} settings "
            f"took {sum(row['seconds'] for row in rows):.1f} s together.",
            "",
            "| setting | validation accuracy | validation loss | epochs | seconds |",
            "|---|---|---|---|---|",
            *(
                f"| {row['setting']}{' (chosen)' if row['chosen'] else ''} | {row['validation_accuracy']:.4f} | "
                f"{row['validation_loss']:.4f} | {row['epochs']} | {row['seconds']} |"
                for row in rows
            ),
        ]
    lines += ["", "Wall time per run (s): " + ", ".join(f"{r['name']} {r['seconds']}" for r in results), ""]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "trust.md").write_text("\n".join(lines))
    (RESULTS / "trust.json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
