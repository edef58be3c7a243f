"""Labelled image files turned into one manifest: hashed, checked, de-duplicated and split.

A manifest is a Parquet table with one row per usable image: its path, class, content hash and
split. Splits are decided by the content hash, so an image keeps its split from run to run no
matter how the folder is listed or what else is added. Files that cannot be used are skipped and
listed in the data report, never a crash.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from headstart.data.images import check_image
from headstart.errors import HeadstartError
from headstart.infra.cache_files import read_or_drop
from headstart.infra.storage import file_sha256, write_parquet_atomic

SPLITS = ("train", "validation", "test")


@dataclass
class DataReport:
    """What a source held and what was left out, with reasons."""

    source: str
    class_names: list[str]
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "class_names": self.class_names,
            "counts": self.counts,
            "skipped": self.skipped,
            "notes": self.notes,
        }


# Files named in a skipped-files line; the rest are counted (all are in the data report).
SKIPPED_SHOWN = 5


def skipped_summary(skipped: list[dict[str, str]], shown: int = SKIPPED_SHOWN) -> str | None:
    """One line for files left out: how many, and the first few with their reasons; None for none."""
    if not skipped:
        return None
    named = "; ".join(f"{entry['path']} ({entry['reason']})" for entry in skipped[:shown])
    more = f"; and {len(skipped) - shown} more" if len(skipped) > shown else ""
    return f"headstart: {len(skipped)} file{'s' if len(skipped) != 1 else ''} skipped: {named}{more}"


@dataclass(frozen=True)
class Manifest:
    """A small handle to a manifest file: what crosses task boundaries instead of the images."""

    path: Path
    class_names: tuple[str, ...]
    fingerprint: str

    def read(self) -> pa.Table:
        return pq.read_table(self.path)


# --- splitting --------------------------------------------------------------------------------


def hash_fraction(sha256: str) -> float:
    """Maps a content hash to a number in [0, 1), uniformly and stably."""
    return int(sha256[:13], 16) / 16**13


def assign_split(sha256: str, validation_fraction: float, test_fraction: float) -> str:
    position = hash_fraction(sha256)
    if position < test_fraction:
        return "test"
    if position < test_fraction + validation_fraction:
        return "validation"
    return "train"


# --- scanning files into a manifest ----------------------------------------------------------


def _scan_cache_path(cache_dir: Path) -> Path:
    return Path(cache_dir) / "scan-cache.parquet"


_HEX_SHA256 = re.compile("[0-9a-f]{64}")
SCAN_CACHE_COLUMNS = {
    "path": pa.string(),
    "size": pa.int64(),
    "mtime_ns": pa.int64(),
    "sha256": pa.string(),
    "error": pa.string(),
}


def _load_scan_cache(cache_dir: Path) -> dict[tuple[str, int, int], tuple[str, str]]:
    """What earlier scans found; nothing where the cache is damaged (then dropped: every file is
    hashed afresh, only slower)."""
    return (
        read_or_drop(_scan_cache_path(cache_dir), _read_scan_cache, "scan cache", "its files are scanned again") or {}
    )


def cached_scans(cache_dir: Path) -> dict[tuple[str, int, int], tuple[str, str]]:
    """What earlier scans found: (resolved path, size, mtime_ns) → (sha256, error)."""
    return _load_scan_cache(cache_dir)


def _read_scan_cache(path: Path) -> dict[tuple[str, int, int], tuple[str, str]]:
    table = pq.read_table(path, page_checksum_verification=True)
    if table.schema != pa.schema(SCAN_CACHE_COLUMNS):
        raise ValueError(f"columns {table.schema.names}")
    table = table.to_pydict()
    # Well-formed but not what a scan writes: every entry holds its file's SHA-256, which names the
    # image in the manifest and the feature cache.
    if not all(_HEX_SHA256.fullmatch(sha) for sha in table["sha256"]):
        raise ValueError("a content hash that is not a SHA-256")
    return {
        (p, s, m): (h, e)
        for p, s, m, h, e in zip(table["path"], table["size"], table["mtime_ns"], table["sha256"], table["error"])
    }


def _save_scan_cache(cache_dir: Path, entries: dict[tuple[str, int, int], tuple[str, str]]) -> None:
    keys = list(entries)
    table = pa.table(
        {
            "path": [k[0] for k in keys],
            "size": [k[1] for k in keys],
            "mtime_ns": [k[2] for k in keys],
            "sha256": [entries[k][0] for k in keys],
            "error": [entries[k][1] for k in keys],
        },
        schema=pa.schema(SCAN_CACHE_COLUMNS),
    )
    # Page checksums: a hash damaged on disk must not put an image in another's place.
    write_parquet_atomic(_scan_cache_path(cache_dir), table, write_page_checksum=True)


def _forget_scanned(cache_dir: Path, resolved_paths: set[str]) -> None:
    cache = _load_scan_cache(cache_dir)
    kept = {key: value for key, value in cache.items() if key[0] not in resolved_paths}
    if len(kept) < len(cache):
        _save_scan_cache(cache_dir, kept)


def scan_files(resolved_paths: list[str], cache_dir: Path, show_progress: bool = False) -> list[tuple[str, str]]:
    """Hashes and test-decodes files, reusing results for files whose size and mtime are unchanged.

    Takes resolved paths (the cache's keys); returns (sha256, error) per path, error '' for a usable image.
    """
    cache = _load_scan_cache(cache_dir)
    results, changed = [], False
    for path in tqdm(resolved_paths, desc="scan images", unit="img", disable=None if show_progress else True):
        try:
            stat = os.stat(path)
            key = (path, stat.st_size, stat.st_mtime_ns)
            if key not in cache:
                cache[key] = (file_sha256(Path(path)), check_image(Path(path)) or "")
                changed = True
        except (
            OSError
        ) as error:  # unreadable (permissions, I/O) or gone since listed: a reason, and looked at afresh next time
            results.append(("", f"cannot read: {error.strerror or type(error).__name__}"))
            continue
        results.append(cache[key])
    if changed:
        _save_scan_cache(cache_dir, cache)
    return results


def build_manifest(
    labelled_files: list[tuple[Path, int, str | None]],
    class_names: list[str],
    report: DataReport,
    cache_dir: Path,
    validation_fraction: float,
    test_fraction: float,
    max_images_per_class: int | None = None,
    show_progress: bool = False,
    copy_of: tuple[Path, str] | None = None,
) -> Manifest:
    """Hashes, checks and splits files into a manifest; `fixed_split` (third item) overrides the hash split.

    With `copy_of` (a local copy of a store folder, and that folder's URL), the manifest names each
    file by its URL, so that the same images make the same manifest on every machine."""
    resolved = [os.path.realpath(path) for path, _, _ in labelled_files]  # symlinked datasets point at their files
    scanned = scan_files(resolved, cache_dir, show_progress)
    if copy_of is not None:
        copy_root, url = os.path.realpath(copy_of[0]), copy_of[1]
        named = [f"{url}/{Path(os.path.relpath(path, copy_root)).as_posix()}" for path in resolved]
    else:
        named = resolved
    rows = {"path": [], "label": [], "class_name": [], "sha256": [], "split": []}
    first_seen: dict[str, tuple[Path, int]] = {}
    per_class = [0] * len(class_names)
    for (path, label, fixed_split), resolved_path, (sha256, error) in zip(labelled_files, named, scanned):
        if error:
            report.skipped.append({"path": str(path), "reason": error})
            continue
        if sha256 in first_seen:
            other_path, other_label = first_seen[sha256]
            reason = "duplicate of" if other_label == label else f"same image as (class {class_names[other_label]})"
            report.skipped.append({"path": str(path), "reason": f"{reason} {other_path}"})
            continue
        capped = fixed_split != "test"  # an official test set is never cut
        if capped and max_images_per_class is not None and per_class[label] >= max_images_per_class:
            continue
        first_seen[sha256] = (path, label)
        if capped:
            per_class[label] += 1
        if fixed_split == "test":
            split = "test"
        elif fixed_split == "train":
            split = assign_split(sha256, validation_fraction, 0.0)
        else:
            split = assign_split(sha256, validation_fraction, test_fraction)
        rows["path"].append(resolved_path)
        rows["label"].append(label)
        rows["class_name"].append(class_names[label])
        rows["sha256"].append(sha256)
        rows["split"].append(split)
    table = pa.table({**rows, "label": pa.array(rows["label"], pa.int32())})
    return _write_manifest(table, class_names, report, cache_dir)


def without_images(
    manifest: Manifest, report: DataReport, left_out: list[tuple[str, str, str]], cache_dir: Path
) -> tuple[Manifest, DataReport]:
    """The manifest less the images left out after it was built, as (content hash, path, reason),
    and the data report listing them with their reasons; the scan cache forgets their files, so
    the next run hashes them afresh."""
    if not left_out:
        return manifest, report
    gone = {sha for sha, _, _ in left_out}
    table = manifest.read()
    table = table.filter(pa.array([sha not in gone for sha in table.column("sha256").to_pylist()]))
    report = DataReport(
        report.source,
        list(report.class_names),
        dict(report.counts),
        report.skipped + [{"path": path, "reason": reason} for _, path, reason in left_out],
        list(report.notes),
    )
    _forget_scanned(cache_dir, {path for _, path, _ in left_out})
    return _write_manifest(table, list(manifest.class_names), report, cache_dir), report


def _write_manifest(table: pa.Table, class_names: list[str], report: DataReport, cache_dir: Path) -> Manifest:
    """Counts the table's images per split and class into the report, checks that it can train,
    and writes it under its fingerprint."""
    labels, splits = table.column("label").to_pylist(), table.column("split").to_pylist()
    for split in SPLITS:
        report.counts[split] = {
            name: sum(1 for s, label in zip(splits, labels) if s == split and label == i)
            for i, name in enumerate(class_names)
        }
    for split in ("train", "test"):
        if sum(report.counts[split].values()) == 0:
            raise HeadstartError(
                f"no usable images in the {split} split of {report.source}; {len(report.skipped)} files were skipped"
            )
    for name in class_names:
        images = sum(report.counts[split][name] for split in SPLITS)
        if images == 0:
            raise HeadstartError(f"class {name!r} has no usable images in {report.source}")
        if report.counts["train"][name] == 0:
            raise HeadstartError(
                f"class {name!r} has {images} usable image{'s' if images > 1 else ''} in {report.source} "
                "and the split by content hash put none in training: give it more images"
            )
        if report.counts["test"][name] == 0:
            note = (
                f"class {name!r} has no test images (of its {images}): its test metrics are not measured; "
                "give it more images"
            )
            if note not in report.notes:
                report.notes.append(note)
    digest = hashlib.sha256()
    # Paths count too: the plots of a run read its images back from them.
    for sha256, label, split, path in zip(
        table.column("sha256").to_pylist(), labels, splits, table.column("path").to_pylist()
    ):
        digest.update(f"{sha256}:{label}:{split}:{path};".encode())
    digest.update("|".join(class_names).encode())
    fingerprint = digest.hexdigest()[:16]
    path = write_parquet_atomic(Path(cache_dir) / "manifests" / f"{fingerprint}.parquet", table)
    return Manifest(path=path, class_names=tuple(class_names), fingerprint=fingerprint)
