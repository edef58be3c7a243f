"""Folders of labelled images, laid out as Keras' image_dataset_from_directory reads them:
root/CLASS/**/IMAGE. Hidden files and folders are left out; non-image files are reported."""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

from headstart.data.images import IMAGE_SUFFIXES, UNREADABLE_IMAGE_SUFFIXES
from headstart.data.manifest import DataReport
from headstart.errors import HeadstartError


def list_image_folder(
    root: Path, classes: tuple[str, ...] | None, report: DataReport
) -> tuple[list[tuple[Path, int, None]], list[str]]:
    """Lists an image_dataset_from_directory-style folder: root/CLASS/**/IMAGE."""
    root = Path(root)
    if not root.is_dir():
        where = "" if root.is_absolute() else f" (relative to the working directory: {root.absolute()})"
        raise HeadstartError(f"data folder not found: {root}{where}")
    available = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes is None:
        class_names = available
    else:
        missing = [name for name in classes if name not in available]
        if missing:
            raise HeadstartError(
                f"class folder(s) {', '.join(missing)} not found in {root}; it has: {', '.join(available) or 'none'}"
            )
        class_names = list(classes)
    if len(class_names) < 2:
        raise HeadstartError(f"{root} needs at least two class sub-folders of images, found {len(class_names)}")
    for name in class_names:
        if any(unicodedata.category(character) == "Cc" for character in name):
            # A label holding a tab or a line break would split predict's tab-separated lines and
            # CSV rows wherever a reader does not expect quoting; a model's labels stay plain text.
            raise HeadstartError(
                f"class folder {str(root / name)!r} has a control character (tab, line break) in its name, "
                "which a class name cannot hold; rename the folder"
            )
    return list_class_files(root, class_names, report), class_names


def list_class_files(root: Path, class_names: list[str], report: DataReport) -> list[tuple[Path, int, None]]:
    """(path, label, None) for every image under root/CLASS; labels index class_names; absent classes have none."""
    files = []
    for label, name in enumerate(class_names):
        images, others = image_files(Path(root) / name)
        report.skipped.extend(others)
        files.extend((path, label, None) for path in images)
    return files


def image_files(directory: Path) -> tuple[list[Path], list[dict[str, str]]]:
    """The image files under directory (see `visible_files`), and every other entry, each with its reason."""
    images = []
    files, others = visible_files(directory)
    for path in files:
        if path.suffix.lower() in IMAGE_SUFFIXES:
            images.append(path)
        elif path.suffix.lower() in UNREADABLE_IMAGE_SUFFIXES:
            others.append(
                {
                    "path": str(path),
                    "reason": (
                        f"{path.suffix.lower()[1:].upper()} images cannot be decoded here; convert them to JPEG or PNG"
                    ),
                }
            )
        else:
            others.append({"path": str(path), "reason": "not an image file"})
    return images, others


def visible_files(directory: Path) -> tuple[list[Path], list[dict[str, str]]]:
    """Files under directory, in sorted(rglob) order, and what was left out, each with its reason:
    hidden files and folders (a name starting with '.'), links that lead nowhere (broken, or a
    loop) and names that are not UTF-8. Images in sub-folders of a class folder belong to that class.

    Symlinked folders are not entered (as rglob does not); symlinked files count, wherever they
    point (a symlinked dataset is a common layout). Each entry's type comes from the directory
    listing, where rglob + is_file made a system call per file.
    """
    found, left_out, pending = [], [], [str(directory)]
    while pending:
        try:
            entries = list(os.scandir(pending.pop()))
        except OSError:  # a missing or unreadable folder holds no images
            continue
        for entry in entries:
            if not _is_utf8(entry.path):
                printable = entry.path.encode("utf-8", "backslashreplace").decode("utf-8")
                left_out.append(
                    {
                        "path": printable,
                        "reason": "its name is not valid UTF-8, which the dataset files require: rename it",
                    }
                )
            elif entry.name.startswith("."):
                left_out.append(
                    {
                        "path": entry.path,
                        "reason": "hidden " + ("folder" if entry.is_dir(follow_symlinks=False) else "file"),
                    }
                )
            elif entry.is_dir(follow_symlinks=False):
                pending.append(entry.path)
            elif entry.is_symlink() and not os.path.exists(entry.path):
                left_out.append({"path": entry.path, "reason": "a link that leads nowhere (broken, or a loop)"})
            elif entry.is_file():
                found.append(entry.path)
    return [Path(path) for path in sorted(found, key=_listing_order)], sorted(
        left_out, key=lambda entry: _listing_order(entry["path"])
    )


def _is_utf8(path: str) -> bool:
    try:
        path.encode("utf-8")
        return True
    except UnicodeEncodeError:  # bytes that are not UTF-8, kept by Python as lone surrogates
        return False


def _listing_order(path: str) -> list[str]:
    return path.split(os.sep)
