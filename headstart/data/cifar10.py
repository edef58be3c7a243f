"""The CIFAR-10 python archive: fetched, checked, and its chosen classes written out as PNG files.

The archive's batches are pickles; they are read by an unpickler that builds only arrays, lists
and dicts, so a crafted batch cannot run code.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from headstart.data.manifest import DataReport, scan_files
from headstart.errors import HeadstartError, first_line
from headstart.infra.cache_files import drop_damaged, read_or_drop
from headstart.infra.downloads import DownloadPolicy, download
from headstart.infra.storage import file_digest, file_sha256, write_bytes_atomic, write_json_atomic

CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_BATCHES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
CIFAR10_MEMBERS = (*CIFAR10_BATCHES["train"], *CIFAR10_BATCHES["test"])
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class _CifarUnpickler(pickle.Unpickler):
    """Builds only numpy arrays, lists and dicts: a CIFAR batch needs nothing else."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 spell bytes
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return _allowed_global(name)
        raise HeadstartError(f"CIFAR-10 batch refers to {module}.{name}; refusing to unpickle it")


def _allowed_global(name: str):
    if name == "encode":
        import codecs

        return codecs.encode
    if name in ("_reconstruct", "scalar"):
        from numpy._core import multiarray

        return getattr(multiarray, name)
    return getattr(np, name)


def _read_cifar_batch(data: bytes) -> tuple[np.ndarray, list[int]]:
    batch = _CifarUnpickler(io.BytesIO(data), encoding="bytes").load()
    images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    labels = [int(label) for label in batch[b"labels"]]
    if len(labels) != len(images):
        raise ValueError(f"a batch has {len(images)} images but {len(labels)} labels")
    outside = [label for label in labels if not 0 <= label < len(CIFAR10_CLASSES)]
    if outside:
        raise ValueError(f"label {outside[0]} is not one of the {len(CIFAR10_CLASSES)} classes")
    return images, labels


def fetch_cifar10_archive(
    source: str, cache_dir: Path, report: DataReport, policy: DownloadPolicy = DownloadPolicy()
) -> Path:
    """The archive at source (a URL, downloaded once into the cache, or a local path).

    The official URL must serve the official file: its md5 is checked before the download takes
    its place in the cache, and again whenever the cached copy is used. Any other source may
    hold a different archive (a mirror, a subset), which is used with a note provided it is a
    CIFAR-10 python archive; a download that is not one is removed from the cache, so that a
    later run fetches it again instead of reusing it.
    """
    if "://" not in source:
        archive = Path(source).expanduser()
        if not archive.is_file():
            raise HeadstartError(f"CIFAR-10 archive not found: {archive}")
        _note_unofficial(archive, report)
        return archive
    name = source.rstrip("/").rsplit("/", 1)[-1] or "cifar-10-python.tar.gz"
    url_key = hashlib.sha256(source.encode()).hexdigest()[:8]
    official = source.startswith("https://www.cs.toronto.edu/")
    archive = download(
        source,
        Path(cache_dir) / "downloads" / f"{url_key}-{name}",
        checksum=f"md5:{CIFAR10_MD5}" if official else None,
        policy=policy,
    )
    try:
        if not official and _note_unofficial(archive, report):
            _require_cifar_members(archive)
    except HeadstartError as error:
        archive.unlink(missing_ok=True)
        raise HeadstartError(
            f"{source} did not serve a usable CIFAR-10 archive: {error}; it was removed from the cache"
        ) from None
    return archive


def _note_unofficial(archive: Path, report: DataReport) -> bool:
    md5 = file_digest(archive, "md5")
    if md5 == CIFAR10_MD5:
        return False
    report.notes.append(f"archive md5 {md5} is not the official CIFAR-10 release ({CIFAR10_MD5})")
    return True


def _require_cifar_members(archive: Path) -> None:
    try:
        with tarfile.open(archive, "r:gz") as tar:
            names = {Path(member.name).name for member in tar.getmembers() if member.isfile()}
    except (tarfile.TarError, EOFError, OSError) as error:
        raise HeadstartError(f"not a readable tar.gz ({first_line(error)})") from None
    missing = [name for name in CIFAR10_MEMBERS if name not in names]
    if missing:
        raise HeadstartError(f"not a CIFAR-10 python archive ({', '.join(missing)} missing)")


# Written last: how many images of each split the extraction holds.
EXTRACTION_RECORD = "complete"


def _intact_extraction(root: Path) -> bool:
    """Whether the archive's images are all there, as many per split as were written; where some
    are gone or the record is damaged, the folder is dropped (with one warning) to be extracted again."""
    again = "extracted again from the archive"
    record = root / EXTRACTION_RECORD
    recorded = read_or_drop(record, _read_extraction_record, "CIFAR-10 extraction record", again, [root])
    if recorded is None:
        return False
    found = {split: sum(1 for _ in (root / split).glob("*/*.png")) for split in recorded}
    if found != recorded:
        drop_damaged(root, "CIFAR-10 extraction", f"{found} images, where {recorded} were written", again)
        return False
    return True


def _read_extraction_record(path: Path) -> dict[str, int]:
    text = path.read_text()
    if text == "ok\n":  # written before the counts were kept
        return {}
    counts = json.loads(text)
    if not isinstance(counts, dict) or not all(
        split in CIFAR10_BATCHES and isinstance(n, int) and not isinstance(n, bool) for split, n in counts.items()
    ):
        raise ValueError("not a count of images per split")
    return counts


# Written before the record: the content hash of every image written, by its path under the folder.
IMAGE_HASHES = "sha256.json"


def _unchanged_images(root: Path, classes: tuple[str, ...], cache_dir: Path) -> bool:
    """Whether the chosen classes' images still hold what was written, by the hashes the scan
    computes anyway (and keeps in its cache); where one does not, or the hashes are damaged, the
    folder is dropped (with one warning naming the image) to be extracted again. An extraction
    made before the hashes were kept is trusted."""
    again = "extracted again from the archive"
    written = read_or_drop(root / IMAGE_HASHES, _read_image_hashes, "CIFAR-10 image hashes", again, [root])
    if written is None:
        return not (root / IMAGE_HASHES).exists() and (root / EXTRACTION_RECORD).exists()
    names = sorted(name for name in written if name.split("/")[1] in classes)
    # Keyed as the scan keys them (resolved paths); the folder's own files are no symlinks.
    real_root = os.path.realpath(root)
    scanned = scan_files([os.path.join(real_root, *name.split("/")) for name in names], cache_dir)
    changed = [name for name, (sha, _) in zip(names, scanned) if sha != written[name]]
    if changed:
        others = f" (and {len(changed) - 1} other images)" if len(changed) > 1 else ""
        reason = f"its content is not what the archive holds{others}"
        drop_damaged(root / changed[0], "CIFAR-10 image", reason, again, [root])
        return False
    return True


def _read_image_hashes(path: Path) -> dict[str, str]:
    hashes = json.loads(path.read_bytes())
    if not isinstance(hashes, dict) or not all(
        isinstance(name, str) and name.count("/") == 2 and isinstance(sha, str) for name, sha in hashes.items()
    ):
        raise ValueError("not a content hash per image")
    return hashes


def _extract(archive: Path, root: Path) -> dict[str, int]:
    """Writes every image of both official splits as a PNG file, and their content hashes;
    returns how many per split."""
    counts, hashes = {}, {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            for split, names in CIFAR10_BATCHES.items():
                index = 0
                for name in names:
                    if name not in members:
                        raise HeadstartError(f"{archive} is not a CIFAR-10 python archive: {name} is missing")
                    images, labels = _read_cifar_batch(tar.extractfile(members[name]).read())
                    for image, label in zip(images, labels):
                        name = f"{split}/{CIFAR10_CLASSES[label]}/{index:05d}.png"
                        png = io.BytesIO()
                        Image.fromarray(image).save(png, format="PNG")
                        write_bytes_atomic(root / name, png.getvalue())
                        hashes[name] = hashlib.sha256(png.getvalue()).hexdigest()
                        index += 1
                counts[split] = index
    except (tarfile.TarError, EOFError, OSError, pickle.UnpicklingError, KeyError, ValueError) as error:
        raise HeadstartError(f"{archive} is not a readable CIFAR-10 python archive: {error}") from None
    write_json_atomic(root / IMAGE_HASHES, hashes)
    return counts


def extract_cifar10(archive: Path, classes: tuple[str, ...], cache_dir: Path) -> list[tuple[Path, int, str]]:
    """Writes the chosen classes of both official splits as PNG files; returns (path, label, split)."""
    unknown = [name for name in classes if name not in CIFAR10_CLASSES]
    if unknown:
        raise HeadstartError(
            f"unknown CIFAR-10 class(es) {', '.join(unknown)}; choose from {', '.join(CIFAR10_CLASSES)}"
        )
    archive_key = file_sha256(archive)[:16]
    root = Path(cache_dir) / "cifar10" / archive_key
    if not (_intact_extraction(root) and _unchanged_images(root, classes, cache_dir)):
        counts = _extract(archive, root)
        write_json_atomic(root / EXTRACTION_RECORD, counts)
    files = []
    for split in ("train", "test"):
        for label, name in enumerate(classes):
            for path in sorted((root / split / name).glob("*.png")):
                files.append((path, label, split))
    return files
