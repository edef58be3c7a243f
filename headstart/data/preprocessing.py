"""Image preprocessing, the same everywhere in headstart: decode, resize, normalise.

Images stream through decode → shrink → batch, so memory stays bounded whatever the dataset
size. TensorFlow is imported only where a resize runs: a LiteRT model already converted enlarges
images itself, so extraction can decode without it.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from headstart.data.images import ImageChanged, load_image
from headstart.errors import first_line

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_images(images, image_size: int):
    """Resizes a float batch to image_size × image_size, the same way everywhere in headstart.

    Antialiasing matters when photos are shrunk; at scale 1 it is the identity, so resizing an
    already-resized batch again changes nothing.
    """
    from headstart.infra.keras import tf

    return tf.image.resize(images, (image_size, image_size), method="bilinear", antialias=True)


def enlarge_images(images, image_size: int):
    """Enlarges a float batch to image_size × image_size with plain bilinear interpolation.

    Where no side shrinks, antialiasing changes nothing (the tests check 1e-6) but costs time;
    LiteRT has this resize and not the antialiased one.
    """
    from headstart.infra.keras import tf

    return tf.image.resize(images, (image_size, image_size), method="bilinear")


def imagenet_normalization():
    """A function [0, 1] RGB → the ImageNet-normalised input the backbone network takes.

    Its constants are made once, here: a traced function that calls it captures them rather
    than adding them to its own graph.

    It is one multiply and one add, (x − mean) / std rearranged: quantized to int8, a subtraction
    followed by a division kept the difference on the coarse scale of the quotient, about two
    bits less precise than the pixels, and that input noise grew through the network until int8
    models disagreed with the float one on many more images (docs/edge.md).
    """
    from headstart.infra.keras import tf

    scale = tf.constant(1.0 / np.array(IMAGENET_STD, np.float64), tf.float32)
    offset = tf.constant(-np.array(IMAGENET_MEAN, np.float64) / np.array(IMAGENET_STD, np.float64), tf.float32)
    return lambda images: images * scale + offset


# Batches decoded ahead of the forward pass: enough to hide decoding, few enough to bound memory.
PREFETCH = 2


@dataclass
class DecodedBatch:
    """One batch of decoded images: `indices` are the positions, in the paths given, of the
    `images`; `unusable` holds (position, reason) for the files that failed to decode now though
    they were checked before (rewritten or removed in between), which are not in `images`."""

    indices: list[int] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)
    unusable: list[tuple[int, str]] = field(default_factory=list)


def decoded_batches(paths: list[str], image_size: int, batch_size: int, expected_hashes: list[str] | None = None):
    """Yields a DecodedBatch of float32 images [h, w, 3] in [0, 1] per batch of paths, decoding the
    next batches while the consumer runs.

    Images larger than image_size on any side are shrunk to it (with antialiasing) right away, so
    a batch of photos holds no more than a batch of resized images; smaller ones keep their size,
    since the LiteRT model enlarges them itself. Decoding (PIL) and resizing (TensorFlow) release
    the GIL, so a background thread overlaps them with the forward pass; at most `PREFETCH`
    batches wait in memory. With expected_hashes (one per path), an image is used only if its
    file still holds the content with that hash.
    """
    starts = range(0, len(paths), batch_size)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode") as pool:
        pending: deque = deque()
        for start in starts:
            hashes = expected_hashes[start : start + batch_size] if expected_hashes is not None else None
            pending.append(pool.submit(_decode, paths[start : start + batch_size], start, image_size, hashes))
            if len(pending) > PREFETCH:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _decode(paths: list[str], first_index: int, image_size: int, expected_hashes: list[str] | None) -> DecodedBatch:
    batch = DecodedBatch()
    for offset, path in enumerate(paths):
        try:
            pixels = load_image(path, expected_sha256=expected_hashes[offset] if expected_hashes is not None else None)
        except ImageChanged as change:
            batch.unusable.append((first_index + offset, str(change)))
            continue
        except Exception as error:  # PIL and the file system raise many types; each means 'unusable now'.
            batch.unusable.append(
                (first_index + offset, f"could not be read when decoded: {type(error).__name__}: {first_line(error)}")
            )
            continue
        batch.indices.append(first_index + offset)
        batch.images.append(shrunk_to_fit(pixels.astype(np.float32) / 255.0, image_size))
    return batch


def apply_to_decoded(batches, function, progress=None) -> tuple[np.ndarray | None, list[int], list[tuple[int, str]]]:
    """`function` applied to the images of each DecodedBatch, its outputs concatenated in order
    (None when no image decoded); the positions of the images they belong to; and (position,
    reason) of the files that did not decode. `progress.update` counts every file, used or not."""
    outputs, kept, unusable = [], [], []
    for batch in batches:
        if batch.indices:
            outputs.append(function(batch.images))
            kept.extend(batch.indices)
        unusable.extend(batch.unusable)
        if progress is not None:
            progress.update(len(batch.indices) + len(batch.unusable))
    return (np.concatenate(outputs) if outputs else None), kept, unusable


def shrunk_to_fit(image: np.ndarray, image_size: int) -> np.ndarray:
    """The image resized (with antialiasing) to image_size × image_size where any side is larger; else itself."""
    if max(image.shape[:2]) > image_size:
        return resize_images(image[np.newaxis], image_size).numpy()[0]
    return image


def image_batches(paths: list[str], image_size: int, batch_size: int, expected_hashes: list[str] | None = None):
    """decoded_batches, with each batch's images resized here into one float32 array [n, size, size, 3]."""
    for decoded in decoded_batches(paths, image_size, batch_size, expected_hashes):
        if decoded.images:
            decoded.images = resize_batch(decoded.images, image_size)
        yield decoded


def resize_batch(images, image_size: int) -> np.ndarray:
    """Images of any sizes as one batch at image_size: one resize call where they share a size.

    Small images (such as CIFAR's 32 px) are enlarged without antialiasing (`enlarge_images`).
    """
    if len({image.shape for image in images}) > 1:
        return np.concatenate([resize_batch(image[np.newaxis], image_size) for image in images])
    images = np.asarray(images if isinstance(images, np.ndarray) else np.stack(images), np.float32)
    if images.shape[1:3] == (image_size, image_size):
        return images
    if max(images.shape[1:3]) <= image_size:
        return enlarge_images(images, image_size).numpy()
    return resize_images(images, image_size).numpy()
