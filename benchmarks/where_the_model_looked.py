"""Where the model looked, measured on a real run: how exact the class activation map is, whether
it points at what the model uses, what it costs, and the example picture of docs/trust.md.

    uv run python benchmarks/where_the_model_looked.py --run artifacts/<run> [--images 300] [--seed 0]

The run comes from `headstart train --data path/to/cifar10-catdog` (the test split's images are
read from its features file's paths). Written to benchmarks/results/where-the-model-looked.md and
docs/where-the-model-looked-example.png:

1. exactness: the largest gap between a CAM's spatial mean and the head's logit, and between the
   probabilities computed from the map and those `headstart predict`'s path gives (the run's
   backbone and head on the test split's cached features);
2. faithfulness (a deletion check): each image's hottest map cell, then a random other cell,
   painted over with the image's mean colour; how much the predicted class's probability falls
   in each case. A map that shows what the model uses makes the first fall larger;
3. the time of one image through the feature map and one overlay PNG.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import time
from pathlib import Path

import numpy as np
from PIL import Image

from headstart.data.images import load_image
from headstart.evaluation.attention import (
    class_activation_maps,
    evidence_maps,
    explain_images,
    feature_map_function,
    overlay_grid_png,
    overlay_png,
)
from headstart.features.dataset import FeatureSet
from headstart.registry.runs import Run

PROJECT = Path(__file__).resolve().parents[1]
RESULTS = PROJECT / "benchmarks" / "results" / "where-the-model-looked.md"
EXAMPLE = PROJECT / "docs" / "where-the-model-looked-example.png"


def _probabilities(logits: np.ndarray) -> np.ndarray:
    exponentials = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return exponentials / exponentials.sum(axis=-1, keepdims=True)


def _painted(image: np.ndarray, cell: tuple[int, int], cells: int) -> np.ndarray:
    """The image with one cell of a cells × cells grid over it painted with the image's mean colour."""
    height, width = image.shape[:2]
    row, column = cell
    top, bottom = round(row * height / cells), round((row + 1) * height / cells)
    left, right = round(column * width / cells), round((column + 1) * width / cells)
    painted = image.astype(np.float32).copy()
    painted[top:bottom, left:right] = image.reshape(-1, 3).mean(axis=0)
    return painted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a run directory trained on cifar10-catdog")
    parser.add_argument("--images", type=int, default=300, help="test images measured (default 300)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    run = Run(Path(args.run))
    datasets = Path(run.config["cache_dir"]) / "datasets"
    pattern = f"*-{run.config['backbone_fingerprint']}-{run.image_size}px-*.parquet"
    candidates = sorted(datasets.glob(pattern), key=lambda path: path.stat().st_mtime)
    if not candidates:
        raise SystemExit(f"no features file {pattern} under {datasets}: train the run with this cache first")
    kernel, bias = run.head_weights()
    feature_map = feature_map_function(run.backbone)
    names = run.class_names
    cached, labels, paths = FeatureSet(candidates[-1], 0, 0, "cache").load("test")
    generator = np.random.default_rng(args.seed)
    chosen = np.sort(generator.choice(len(paths), size=min(args.images, len(paths)), replace=False))

    gap_logit = gap_probability = 0.0
    drop_hot, drop_random, seconds = [], [], []
    for index in chosen:
        image = load_image(paths[index])
        started = time.perf_counter()
        maps = feature_map(image[None].astype(np.float32) / 255.0)[0]
        explanation = explain_images(lambda _: maps[None], kernel, bias, [paths[index]])[0]
        overlay_png(explanation, names)
        seconds.append(time.perf_counter() - started)
        logits = class_activation_maps(maps, kernel, bias).mean(axis=(0, 1))
        direct = maps.mean(axis=(0, 1)) @ kernel + bias
        gap_logit = max(gap_logit, float(np.abs(logits - direct).max()))
        served = _probabilities(cached[index] @ kernel + bias)
        gap_probability = max(gap_probability, float(np.abs(_probabilities(logits) - served).max()))
        predicted = int(np.argmax(logits))
        evidence = evidence_maps(maps, kernel)[..., predicted]
        cells = evidence.shape[0]
        hot = np.unravel_index(np.argmax(evidence), evidence.shape)
        others = [(r, c) for r in range(cells) for c in range(cells) if (r, c) != hot]
        random_cell = others[generator.integers(len(others))]
        before = _probabilities(logits)[predicted]
        for cell, drops in ((hot, drop_hot), (random_cell, drop_random)):
            painted = feature_map(_painted(image, cell, cells)[None] / 255.0)[0]
            drops.append(before - _probabilities(painted.mean(axis=(0, 1)) @ kernel + bias)[predicted])

    probabilities = _probabilities(cached[chosen] @ kernel + bias)
    predictions = probabilities.argmax(axis=1)
    mistakes = chosen[predictions != labels[chosen]]
    mistakes = mistakes[np.argsort(-probabilities[predictions != labels[chosen]].max(axis=1))][:2]
    right = chosen[predictions == labels[chosen]][:2]
    shown = [*right, *mistakes]
    picture = overlay_grid_png(
        explain_images(feature_map, kernel, bias, [paths[i] for i in shown]),
        labels[shown],
        names,
        "Where the model looked (CIFAR-10 test images)",
    )
    # A palette of 128 colours keeps the page's picture small; the heatmap's gradients survive it.
    image = Image.open(io.BytesIO(picture)).convert("RGB").quantize(128)
    image.save(EXAMPLE, optimize=True)

    drop_hot, drop_random = np.array(drop_hot), np.array(drop_random)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT, capture_output=True, text=True
    ).stdout.strip()
    lines = [
        "# Where the model looked: measured",
        "",
        f"Run `{run.path.name}` ({run.config['backbone']}, {run.image_size} px, map "
        f"{cells} × {cells}), {len(chosen)} test images drawn with seed {args.seed}; "
        f"`benchmarks/where_the_model_looked.py` at commit {commit or 'unknown'}, {os.cpu_count()} CPU cores.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| largest gap, CAM's spatial mean vs the head's logit | {gap_logit:.2e} |",
        f"| largest gap, probability from the map vs from the cached features | {gap_probability:.2e} |",
        f"| mean fall of the predicted class's probability, hottest cell painted over | {drop_hot.mean():.4f} |",
        f"| the same, a random other cell painted over | {drop_random.mean():.4f} |",
        f"| images whose hottest cell lowers it more than the random cell | {np.mean(drop_hot > drop_random):.3f} |",
        f"| seconds per image (feature map + overlay PNG), median | {np.median(seconds):.3f} |",
        "",
    ]
    RESULTS.write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"example: {EXAMPLE} ({EXAMPLE.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
