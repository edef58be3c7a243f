"""Reading image files: decode any common format to RGB, or say why a file cannot be used."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from headstart.errors import first_line

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# Image formats people have that Pillow cannot decode without plug-ins: named as such, not as "not an image".
UNREADABLE_IMAGE_SUFFIXES = {".heic", ".heif", ".avif", ".jxl", ".cr2", ".nef", ".arw", ".dng", ".psd", ".svg"}


class ImageChanged(Exception):
    """The file no longer holds the content that was hashed when it was scanned."""


def load_image(path: Path, draft_size: int | None = None, expected_sha256: str | None = None) -> np.ndarray:
    """Decodes any common image file to RGB uint8 [height, width, 3], honouring EXIF rotation.

    With draft_size, a JPEG may decode at a reduced scale that still covers draft_size on each side.
    With expected_sha256, the bytes are read once, checked against that content hash and decoded
    from memory, so what is decoded is exactly what was hashed: a file rewritten since it was
    scanned raises ImageChanged rather than lending its new pixels to the old content's hash.
    """
    source = path
    if expected_sha256 is not None:
        data = Path(path).read_bytes()
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected_sha256:
            raise ImageChanged(
                f"changed after it was scanned (content hash {expected_sha256[:12]}… then, {actual[:12]}… now)"
            )
        source = io.BytesIO(data)
    with Image.open(source) as image:
        if draft_size is not None:
            image.draft("RGB", (draft_size, draft_size))
        image = ImageOps.exif_transpose(image)
        if image.mode.startswith("I;16") or (image.mode == "I" and np.asarray(image).max() > 255):
            return _sixteen_bit_to_rgb(np.asarray(image))
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _sixteen_bit_to_rgb(pixels: np.ndarray) -> np.ndarray:
    """16-bit grayscale (Pillow's mode I;16, or I holding values above 255) to 8-bit RGB by its top
    8 bits: Pillow's own conversion clips at 255, which turned nearly every 16-bit image white."""
    gray = (np.clip(pixels.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)


def check_image(path: Path) -> str | None:
    """Returns why an image file cannot be used, or None when it decodes."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as image:
            image.load()
            if image.width < 1 or image.height < 1:
                return "empty image"
    except (
        PermissionError,
        FileNotFoundError,
        IsADirectoryError,
    ) as error:  # the file system's word, not the decoder's
        return f"cannot read: {error.strerror}"
    except Exception as error:  # PIL raises many types for damaged files; each means 'unusable'.
        return f"cannot decode: {type(error).__name__}" + (f": {first_line(error)}" if str(error).strip() else "")
    return None
