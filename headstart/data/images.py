"""Reading image files: decode any common format to RGB, or say why a file cannot be used."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def load_image(path: Path, draft_size: int | None = None) -> np.ndarray:
    """Decodes any common image file to RGB uint8 [height, width, 3], honouring EXIF rotation.

    With draft_size, a JPEG may decode at a reduced scale that still covers draft_size on each side.
    """
    with Image.open(path) as image:
        if draft_size is not None:
            image.draft("RGB", (draft_size, draft_size))
        image = ImageOps.exif_transpose(image)
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def check_image(path: Path) -> str | None:
    """Returns why an image file cannot be used, or None when it decodes."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.width < 1 or image.height < 1:
                return "empty image"
    except Exception as error:  # PIL raises many types for damaged files; each means 'unusable'.
        return f"cannot decode: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}".rstrip(": ")
    return None
