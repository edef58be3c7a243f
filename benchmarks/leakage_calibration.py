"""Calibrates the near-duplicate threshold (headstart.config.DEFAULT_NEAR_DUPLICATE_THRESHOLD) on a real dataset.

    uv run python benchmarks/leakage_calibration.py --data /path/to/cifar10-catdog [--cache-dir DIR]

Three measurements, at the default configuration (bundled MobileNetV2, 160 px), written to
benchmarks/results/leakage-calibration.md:

1. the distribution of each test and validation image's cosine similarity to its nearest
   training image (the dataset's features file: the features training used);
2. synthetic copies of training images (JPEG re-encoded, resized, shifted by 1–2 px, brightened
   by 5 %, and, for information, mirrored and cropped) against their originals, through the
   same decode → engine path as extraction: how similar is "the same photo, other bytes";
3. montages of real pairs in similarity bands (benchmarks/results/leakage-pairs-*.jpg), to be
   looked at: where "the same photo" ends and "a similar animal" begins.

The features file comes from a `headstart train` run with the same --data and --cache-dir
(run it first); this script neither trains nor changes the cache.
"""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from headstart.backbone.handles import resolve_backbone
from headstart.config import DEFAULT_NEAR_DUPLICATE_THRESHOLD as DEFAULT_THRESHOLD
from headstart.config import TrainConfig
from headstart.data.preprocessing import decoded_batches
from headstart.data.sources import prepare_source
from headstart.evaluation.near_duplicates import find_near_duplicates, unit_rows
from headstart.features.dataset import FeatureSet, dataset_features_path
from headstart.features.extraction import ExtractionContext, ExtractionSettings

RESULTS = Path(__file__).parent / "results"
BINS = (0.0, 0.6, 0.7, 0.75, 0.8, 0.82, 0.84, 0.86, 0.87, 0.88, 0.89, 0.9, 0.92, 0.94, 0.96, 0.98, 1.0001)
BANDS = ((0.92, 1.01), (0.895, 0.92), (0.87, 0.895), (0.85, 0.87), (0.82, 0.85))
SYNTHETIC_SAMPLES = 300
CANDIDATES = (0.85, 0.86, 0.87, 0.88, 0.89, 0.90, 0.92)
# What follows this line in the results file is written by hand (what the pairs look like) and kept on a re-run.
NOTES_MARKER = "<!-- notes written by hand below: kept when the script rewrites this file -->"


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _shift(image: Image.Image, pixels: int) -> Image.Image:
    """Moved right and down by `pixels`, the uncovered edge repeated (as a slightly shifted crop would look)."""
    array = np.asarray(image)
    padded = np.pad(array, ((pixels, 0), (pixels, 0), (0, 0)), mode="edge")
    return Image.fromarray(padded[: array.shape[0], : array.shape[1]])


def _crop(image: Image.Image, fraction: float) -> Image.Image:
    width, height = image.size
    dx, dy = round(width * fraction / 2), round(height * fraction / 2)
    return image.crop((dx, dy, width - dx, height - dy))


# name → (what it does to a photo, whether it must count as the same photo)
MODIFICATIONS = {
    "JPEG quality 90": (lambda image: _jpeg(image, 90), True),
    "JPEG quality 75": (lambda image: _jpeg(image, 75), True),
    "JPEG quality 50": (lambda image: _jpeg(image, 50), True),
    "resized to 2× (bicubic)": (
        lambda image: image.resize((image.width * 2, image.height * 2), Image.Resampling.BICUBIC),
        True,
    ),
    "resized to 0.75× and back": (
        lambda image: image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.Resampling.BILINEAR).resize(
            image.size, Image.Resampling.BILINEAR
        ),
        True,
    ),
    "shifted 1 px": (lambda image: _shift(image, 1), True),
    "shifted 2 px": (lambda image: _shift(image, 2), True),
    "brightness +5 %": (lambda image: ImageEnhance.Brightness(image).enhance(1.05), True),
    "shifted 1 px, brightness +5 %, JPEG 75": (
        lambda image: _jpeg(ImageEnhance.Brightness(_shift(image, 1)).enhance(1.05), 75),
        True,
    ),
    "mirrored (left-right)": (ImageOps.mirror, False),
    "cropped 10 % (5 % each side)": (lambda image: _crop(image, 0.1), False),
    "cropped 20 %": (lambda image: _crop(image, 0.2), False),
}


def _features(paths: list[str], backbone, context: ExtractionContext) -> np.ndarray:
    engine = context.engine(backbone)
    return np.concatenate([engine(images) for images in decoded_batches(paths, backbone.image_size, 64)])


def synthetic_similarities(
    train_paths: list[str], backbone, context: ExtractionContext, scratch: Path
) -> dict[str, np.ndarray]:
    """Each modification's cosine similarity between a modified copy and its original, per sampled image."""
    originals = _features(train_paths, backbone, context)
    results = {}
    for number, (name, (modify, _)) in enumerate(MODIFICATIONS.items()):
        copies = []
        for index, path in enumerate(train_paths):
            copy = scratch / f"{number}-{index}.png"  # lossless: only the modification changes pixels
            modify(Image.open(path).convert("RGB")).save(copy)
            copies.append(str(copy))
        results[name] = np.einsum("ij,ij->i", unit_rows(originals), unit_rows(_features(copies, backbone, context)))
    return results


def nearest_other_image(train_features: np.ndarray, labels: np.ndarray, sample: np.ndarray) -> np.ndarray:
    """For sampled training images, the similarity of the nearest *other* training image of the same class."""
    units = unit_rows(train_features)
    similarities = units[sample] @ units.T
    similarities[np.arange(len(sample)), sample] = -np.inf
    similarities[labels[None, :] != labels[sample][:, None]] = -np.inf
    return similarities.max(axis=1)


def render_band(pairs, path: Path, columns: int = 4, size: int = 64) -> None:
    """Pairs side by side (held-out image left, nearest training image right), enlarged pixel by pixel."""
    rows = max(1, -(-len(pairs) // columns))
    canvas = Image.new("RGB", (columns * (2 * size + 24), rows * (size + 16)), "white")
    draw = ImageDraw.Draw(canvas)
    for index, pair in enumerate(pairs):
        x, y = (index % columns) * (2 * size + 24), (index // columns) * (size + 16)
        for side, image_path in enumerate((pair.path, pair.train_path)):
            image = Image.open(image_path).convert("RGB").resize((size, size), Image.Resampling.NEAREST)
            canvas.paste(image, (x + side * (size + 2), y + 14))
        draw.text((x, y), f"{pair.similarity:.3f} {Path(pair.path).stem}|{Path(pair.train_path).stem}", fill="black")
    canvas.save(path, quality=75)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--cache-dir", default=".cache/headstart")
    args = parser.parse_args()
    config = TrainConfig(data=args.data, cache_dir=Path(args.cache_dir))
    manifest, _ = prepare_source(config.data, config.runtime.cache_dir)
    backbone = resolve_backbone(config.backbone.handle, config.backbone.image_size, config.runtime.cache_dir)
    features_path = dataset_features_path(manifest, backbone, config.runtime.cache_dir)
    if not features_path.exists():
        raise SystemExit(
            f"no features file {features_path}: "
            f"run `headstart train --data {args.data} --cache-dir {args.cache_dir}` first"
        )
    features = FeatureSet(features_path, 0, 0, "cache")
    check = find_near_duplicates(features, list(manifest.class_names), threshold=0.0)

    lines = [
        f"# Near-duplicate threshold: calibration on `{Path(args.data).name}`",
        "",
        f"Written by `benchmarks/leakage_calibration.py`; bundled MobileNetV2 at {config.backbone.image_size} px "
        f"(the defaults), {check.train_images} training images. Threshold in use: **{DEFAULT_THRESHOLD}**.",
        "",
        "## 1. Each held-out image's cosine similarity to its nearest training image",
        "",
        "| similarity | " + " | ".join(check.splits) + " |",
        "|---|" + "---|" * len(check.splits),
    ]
    histograms = {split: np.histogram(result.similarities, bins=BINS)[0] for split, result in check.splits.items()}
    for index in range(len(BINS) - 1):
        upper = "1" if BINS[index + 1] > 1 else f"{BINS[index + 1]:.2f}"
        lines.append(
            f"| {BINS[index]:.2f}–{upper} | "
            + " | ".join(str(histograms[split][index]) for split in check.splits)
            + " |"
        )
    lines.append("")
    for split, result in check.splits.items():
        quantiles = np.quantile(result.similarities, [0.5, 0.9, 0.99, 1.0])
        lines.append(
            f"{split} ({result.images} images): median {quantiles[0]:.3f}, 90th percentile {quantiles[1]:.3f}, "
            f"99th {quantiles[2]:.3f}, max {quantiles[3]:.3f}."
        )
    lines += [
        "",
        "Images flagged at each candidate threshold:",
        "",
        "| threshold | " + " | ".join(check.splits) + " |",
        "|---|" + "---|" * len(check.splits),
    ]
    for candidate in CANDIDATES:
        lines.append(
            f"| {candidate:.2f} | "
            + " | ".join(str(int((result.similarities >= candidate).sum())) for result in check.splits.values())
            + " |"
        )

    train_features, train_labels, train_paths = features.load("train")
    sample = np.linspace(0, len(train_paths) - 1, SYNTHETIC_SAMPLES).round().astype(int)
    with (
        ExtractionContext(config.runtime.cache_dir, ExtractionSettings()) as context,
        tempfile.TemporaryDirectory() as scratch,
    ):
        synthetic = synthetic_similarities([train_paths[i] for i in sample], backbone, context, Path(scratch))
    others = nearest_other_image(train_features, train_labels, sample)
    lines += [
        "",
        f"## 2. Synthetic copies of {SYNTHETIC_SAMPLES} training images against their originals",
        "",
        "Each copy is decoded and extracted exactly as a dataset image is. Must it count as the same photo: "
        "yes for the modifications a re-upload or a re-save makes; mirrored and cropped copies are shown for "
        "information.",
        "",
        "| copy | same photo | min | 1st percentile | median | " + " | ".join(f"≥ {c:.2f}" for c in CANDIDATES) + " |",
        "|---|---|---|---|---|" + "---|" * len(CANDIDATES),
    ]

    def row(name: str, same: str, values: np.ndarray) -> str:
        return (
            f"| {name} | {same} | {values.min():.3f} | {np.quantile(values, 0.01):.3f} | {np.median(values):.3f} | "
            + " | ".join(f"{(values >= c).mean():.1%}" for c in CANDIDATES)
            + " |"
        )

    lines += [
        row(name, "yes" if MODIFICATIONS[name][1] else "for information", values) for name, values in synthetic.items()
    ]
    lines.append(row("the nearest *other* training image of the same class", "no, unless a real duplicate", others))

    pairs = sorted(
        (pair for result in check.splits.values() for pair in result.pairs), key=lambda pair: -pair.similarity
    )
    lines += ["", "## 3. Real pairs by similarity band (held-out image left, nearest training image right)", ""]
    for low, high in BANDS:
        band = [pair for pair in pairs if low <= pair.similarity < high]
        name = f"leakage-pairs-{low:.3f}-{min(high, 1):.3f}.jpg"
        render_band(band[:24], RESULTS / name)
        lines.append(f"- {low:.3f}–{min(high, 1):.3f}: {len(band)} pairs; the first {min(24, len(band))} in `{name}`")
    results = RESULTS / "leakage-calibration.md"
    notes = results.read_text().partition(NOTES_MARKER)[2] if results.exists() else ""
    results.write_text("\n".join(lines) + "\n\n" + NOTES_MARKER + (notes or "\n"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
