"""The bad-input corpus, generated (no binary fixtures): a folder of two classes, cat and dog,
holding every kind of file a folder people drop images into collects, and what headstart must
do with each: train on it (decoded, RGB, EXIF-rotated), or skip it with a reason."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# name (under cat/ unless it says dog/) → what must happen, and a word the skip reason must hold.
TRAINS = [
    "alpha.png",
    "palette-transparent.png",
    "sixteen-bit.png",
    "sixteen-bit-gray.tiff",
    "gray.jpg",
    "cmyk.jpg",
    "animated.gif",
    "image.webp",
    "image.bmp",
    "rotated.jpg",
    "one-pixel.png",
    "wide.png",
    "outside-link.png",
    "with space.png",
    "nested/deep.png",
    "unreadable.png",
]
SKIPPED = {
    "zero.jpg": "empty file",
    "truncated.jpg": "truncated",
    "truncated.png": "truncated",
    "text.jpg": "cannot identify",
    "error-page.png": "cannot identify",
    "photo.heic": "HEIC",
    "bomb.png": "exceeds limit",
    ".hidden.png": "hidden file",
    ".DS_Store": "hidden file",
    "Thumbs.db": "not an image",
    "notes.txt": "not an image",
    "loop-a.jpg": "leads nowhere",
    "non-utf8-\\udcff.png": "UTF-8",
    "dog/same-as-cat-plain-0.png": "same image",
}


def rgb(seed: int, size: tuple[int, int] = (40, 40)) -> Image.Image:
    """Random pixels, distinct per seed."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def encoded(image: Image.Image, format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format)
    return buffer.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header declaring width × height pixels, with almost no data behind it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 100))
        + chunk(b"IEND", b"")
    )


def write_corpus(root: Path) -> Path:
    cat, dog = root / "cat", root / "dog"
    cat.mkdir(parents=True)
    dog.mkdir(parents=True)
    for i in range(12):
        rgb(i).save(cat / f"plain-{i}.png")
        rgb(100 + i).save(dog / f"plain-{i}.png")
    (cat / "zero.jpg").write_bytes(b"")
    (cat / "truncated.jpg").write_bytes(encoded(rgb(1), "JPEG")[:300])
    (cat / "truncated.png").write_bytes(encoded(rgb(2), "PNG")[:200])
    (cat / "text.jpg").write_text("hello, not an image")
    (cat / "error-page.png").write_text("<html><body>404 Not Found</body></html>")
    Image.fromarray(np.dstack([np.asarray(rgb(3)), np.full((40, 40), 128, np.uint8)])).save(cat / "alpha.png")
    rgb(4).convert("P").save(cat / "palette-transparent.png", transparency=0)
    Image.fromarray((np.arange(1600, dtype=np.uint16).reshape(40, 40) * 40)).save(cat / "sixteen-bit.png")
    Image.fromarray((np.arange(1600, dtype=np.uint16).reshape(40, 40) * 40)).save(cat / "sixteen-bit-gray.tiff")
    rgb(5).convert("L").save(cat / "gray.jpg")
    rgb(6).convert("CMYK").save(cat / "cmyk.jpg")
    rgb(7).save(cat / "animated.gif", save_all=True, append_images=[rgb(8)], duration=100)
    rgb(9).save(cat / "image.webp")
    rgb(10).save(cat / "image.bmp")
    (cat / "photo.heic").write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00heicmif1" + b"\x00" * 64)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    rgb(11, (60, 30)).save(cat / "rotated.jpg", exif=exif.tobytes())
    rgb(12, (1, 1)).save(cat / "one-pixel.png")
    rgb(13, (10000, 2)).save(cat / "wide.png")
    (cat / "bomb.png").write_bytes(bomb_png(60000, 60000))
    (cat / ".hidden.png").write_bytes(encoded(rgb(14), "PNG"))
    (cat / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (cat / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (cat / "notes.txt").write_text("labels")
    os.symlink("loop-b.jpg", cat / "loop-a.jpg")
    os.symlink("loop-a.jpg", cat / "loop-b.jpg")
    outside = root.parent / "outside.png"
    rgb(15).save(outside)
    os.symlink(outside, cat / "outside-link.png")
    rgb(16).save(cat / "unreadable.png")
    os.chmod(cat / "unreadable.png", 0)
    rgb(17).save(cat / "with space.png")
    rgb(18).save(os.fsencode(cat) + b"/non-utf8-\xff.png")
    (cat / "nested").mkdir()
    rgb(19).save(cat / "nested" / "deep.png")
    rgb(0).save(dog / "same-as-cat-plain-0.png")  # same bytes as cat/plain-0.png
    (root / "empty-class").mkdir()
    return root
