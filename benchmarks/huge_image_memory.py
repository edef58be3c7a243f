"""Peak memory of one huge image through the image path, in two checkouts side by side.

    uv run python benchmarks/huge_image_memory.py --before DIR [--before-name NAME] [--after DIR] [--megapixels 100]

Writes a PNG and a JPEG of `--megapixels` (and a small PNG, the baseline), then, for each
checkout and image, starts one process (that checkout's code on PYTHONPATH) that imports
TensorFlow and headstart's image path, notes its peak resident memory (ru_maxrss), then does what
scanning and extraction do with one file: `check_image`, then `decoded_batches` (decode, shrink to
the input size), and notes the peak again. Writes benchmarks/results/huge-image-memory.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

PROJECT = Path(__file__).resolve().parents[1]
RESULTS = PROJECT / "benchmarks" / "results"
IMAGE_SIZE = 224

# Run in a fresh process per case, so that its peak is this one image's.
MEASURE = """
import json, resource, sys, time
from pathlib import Path
from headstart.data.images import check_image
from headstart.data.preprocessing import decoded_batches, resize_images
resize_images(__import__("numpy").zeros((1, 8, 8, 3), "float32"), 4)  # TensorFlow's own start-up, not the image's
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
reason = check_image(Path(sys.argv[1]))
(batch,) = decoded_batches([sys.argv[1]], int(sys.argv[2]), 1)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"reason": reason, "shape": [list(image.shape) for image in batch.images],
                  "unusable": batch.unusable, "seconds": time.perf_counter() - start,
                  "before_mib": before / 1024, "peak_mib": after / 1024}))
"""


def write_images(folder: Path, megapixels: float) -> dict[str, Path]:
    """A smooth colour gradient with a little noise (a photo-like PNG/JPEG, not a pathological one)."""
    side = int(round((megapixels * 1e6) ** 0.5))
    rows = np.linspace(0, 255, side, dtype=np.float32)
    pixels = np.empty((side, side, 3), np.uint8)
    noise = np.random.default_rng(0).integers(0, 16, (side, 3), dtype=np.uint8)
    for row in range(side):
        pixels[row, :, 0] = rows
        pixels[row, :, 1] = rows[row]
        pixels[row, :, 2] = 255 - rows
        pixels[row] += noise[(np.arange(side) + row) % side]
    huge = Image.fromarray(pixels)
    paths = {
        f"PNG {side}×{side} ({side * side / 1e6:.0f} MP)": folder / "huge.png",
        f"JPEG {side}×{side} ({side * side / 1e6:.0f} MP)": folder / "huge.jpg",
        "PNG 640×480 (baseline)": folder / "small.png",
    }
    huge.save(folder / "huge.png", compress_level=1)
    huge.save(folder / "huge.jpg", quality=90)
    huge.resize((640, 480)).save(folder / "small.png")
    return paths


def measure(code: Path, image: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(image), str(IMAGE_SIZE)],
        cwd=code,
        env={**os.environ, "PYTHONPATH": str(code), "TF_CPP_MIN_LOG_LEVEL": "3"},
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"{code} on {image}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="a checkout of the code before the change")
    parser.add_argument("--before-name", default="before", help="what the before checkout is, for the table")
    parser.add_argument("--after", type=Path, default=PROJECT)
    parser.add_argument("--megapixels", type=float, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="huge-images-") as scratch:
        started = time.perf_counter()
        images = write_images(Path(scratch), args.megapixels)
        print(f"images written in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        rows = []
        for label, image in images.items():
            for side, code in (("before", args.before), ("after", args.after)):
                result = measure(code, image)
                print(label, side, result, file=sys.stderr)
                rows.append({"image": label, "bytes": image.stat().st_size, "code": side, **result})
    lines = [
        "# Peak memory of one huge image",
        "",
        f"`benchmarks/huge_image_memory.py --megapixels {args.megapixels:g}`: one process per image and "
        "checkout, which imports TensorFlow and the image path, then checks the file (`check_image`) and "
        f"decodes it as extraction does (`decoded_batches`, shrunk to {IMAGE_SIZE} px). Peak resident "
        "memory (ru_maxrss) before the image and after; the image's cost is the difference. "
        f"Before: {args.before_name}; after: this checkout.",
        "",
        "| image | file size | code | peak before the image (MiB) | peak after (MiB) | the image's cost (MiB) "
        "| decoded shape | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['image']} | {row['bytes'] / 2**20:.0f} MiB | {row['code']} | {row['before_mib']:.0f} "
            f"| {row['peak_mib']:.0f} | {row['peak_mib'] - row['before_mib']:.0f} "
            f"| {'×'.join(map(str, row['shape'][0])) if row['shape'] else row['unusable']} | {row['seconds']:.1f} |"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "huge-image-memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
