"""Reading image files: decode any common format to RGB, or say why a file cannot be used."""

from __future__ import annotations

import hashlib
import io
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from headstart.config import is_url
from headstart.errors import first_line
from headstart.infra.object_store import local_copy

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# Image formats people have that Pillow cannot decode without plug-ins: named as such, not as "not an image".
UNREADABLE_IMAGE_SUFFIXES = {".heic", ".heif", ".avif", ".jxl", ".cr2", ".nef", ".arw", ".dng", ".psd", ".svg"}


class ImageChanged(Exception):
    """The file no longer holds the content that was hashed when it was scanned."""


# Images above this many pixels are shrunk while they are decoded (`decoded_within_bounds`): a
# 100-megapixel file decoded whole and converted to floats took gigabytes. A 24-megapixel photo,
# and anything smaller, decodes exactly as it always did.
HUGE_PIXELS = 25_000_000
# What a huge image is shrunk to, at most: still many times any input size the backbone takes.
REDUCED_PIXELS = 6_000_000
# Modes Pillow cannot shrink, and the nearest it can (as the conversion to RGB would make them anyway).
_REDUCIBLE_MODES = {"P": "RGBA", "PA": "RGBA", "1": "L", "I;16": "I", "I;16B": "I", "I;16L": "I", "I;16N": "I"}
# EXIF orientation → the transposition that undoes it (what ImageOps.exif_transpose applies).
_ORIENTATIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def image_file(path: Path | str) -> Path:
    """Where this machine reads an image: its path, or for a store URL, this machine's copy of it."""
    return local_copy(path) if is_url(path) else Path(path)


def load_image(path: Path | str, draft_size: int | None = None, expected_sha256: str | None = None) -> np.ndarray:
    """Decodes any common image file to RGB uint8 [height, width, 3], honouring EXIF rotation.

    With draft_size, a JPEG may decode at a reduced scale that still covers draft_size on each side.
    An image of more than HUGE_PIXELS comes back shrunk to about REDUCED_PIXELS (see
    `decoded_within_bounds`), so that no image costs more memory than a few hundred megabytes.
    With expected_sha256, the bytes are read once, checked against that content hash and decoded
    from memory, so what is decoded is exactly what was hashed: a file rewritten since it was
    scanned raises ImageChanged rather than lending its new pixels to the old content's hash.
    A store URL (an image of a manifest of a store folder) is read from this machine's copy of it.
    """
    path = image_file(path)
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
        if image.width * image.height > HUGE_PIXELS:
            image = decoded_within_bounds(image)
        else:
            image = ImageOps.exif_transpose(image)
        if image.mode.startswith("I;16") or (image.mode == "I" and np.asarray(image).max() > 255):
            return _sixteen_bit_to_rgb(np.asarray(image))
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def decoded_within_bounds(image: Image.Image) -> Image.Image:
    """A huge image decoded at no more than about REDUCED_PIXELS, EXIF rotation applied: a JPEG at a
    reduced scale of its own (only the scaled pixels are ever held), any other image decoded as
    it is stored (its bytes per pixel, never floats) and shrunk by an integer factor, averaging
    each block of pixels, before anything else copies it."""
    orientation = image.getexif().get(0x0112)
    image.draft(None, _reduced_size(image.size))
    image.load()
    if image.width * image.height > HUGE_PIXELS:  # not a JPEG, or one that scales no further
        if image.mode in _REDUCIBLE_MODES:
            image = image.convert(_REDUCIBLE_MODES[image.mode])
        image = image.reduce(_reduction_factor(image.size))
    transposition = _ORIENTATIONS.get(orientation)
    return image.transpose(transposition) if transposition is not None else image


def _reduction_factor(size: tuple[int, int]) -> int:
    """The least integer factor that brings an image of `size` to at most REDUCED_PIXELS."""
    factor = max(1, math.ceil(math.sqrt(size[0] * size[1] / REDUCED_PIXELS)))
    while math.ceil(size[0] / factor) * math.ceil(size[1] / factor) > REDUCED_PIXELS:
        factor += 1
    return factor


def _reduced_size(size: tuple[int, int]) -> tuple[int, int]:
    factor = _reduction_factor(size)
    return max(1, size[0] // factor), max(1, size[1] // factor)


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
            if image.width * image.height > HUGE_PIXELS:
                image.draft(None, _reduced_size(image.size))  # a JPEG's every block is still decoded
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
