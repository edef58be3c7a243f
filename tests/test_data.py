"""Data sources: folders, the CIFAR-10 archive format, stable splits, bad files, downloads."""

import hashlib
import http.server
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from configs import source_of
from conftest import RunsACommand, write_class_images
from PIL import Image

from headstart.config import TrainConfig
from headstart.data.cifar10 import CIFAR10_CLASSES
from headstart.data.folders import list_class_files
from headstart.data.images import load_image
from headstart.data.manifest import DataReport, assign_split
from headstart.errors import HeadstartError
from headstart.infra.downloads import DownloadPolicy, download


def _config(tmp_path, **values):
    return TrainConfig(cache_dir=tmp_path / "cache", **values)


def test_folder_source_lists_classes_and_splits(colour_folder, tmp_path):
    manifest, report = source_of(
        _config(tmp_path, data=str(colour_folder), test_fraction=0.25, validation_fraction=0.25)
    )
    table = manifest.read().to_pydict()
    assert manifest.class_names == ("blue", "red")
    assert len(table["path"]) == 48
    assert set(table["split"]) == {"train", "validation", "test"}
    assert all(name in path for name, path in zip(table["class_name"], table["path"]))
    assert sum(sum(c.values()) for c in report.counts.values()) == 48


def test_bad_files_are_skipped_and_reported(colour_folder, tmp_path):
    (colour_folder / "red" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (colour_folder / "red" / "notes.txt").write_text("not an image")
    (colour_folder / "blue" / "copy.png").write_bytes((colour_folder / "blue" / "000.png").read_bytes())
    (colour_folder / "blue" / "empty.png").write_bytes(b"")
    manifest, report = source_of(_config(tmp_path, data=str(colour_folder)))
    reasons = {entry["path"].rsplit("/", 1)[-1]: entry["reason"] for entry in report.skipped}
    assert set(reasons) == {"broken.jpg", "notes.txt", "copy.png", "empty.png"}
    assert reasons["notes.txt"] == "not an image file"
    assert reasons["copy.png"].startswith("duplicate of")
    assert reasons["broken.jpg"].startswith("cannot decode")
    assert manifest.read().num_rows == 48


def test_skipped_files_are_one_line_with_the_count_and_the_first_five():
    from headstart.data.manifest import skipped_summary

    assert skipped_summary([]) is None
    one = skipped_summary([{"path": "/d/a.jpg", "reason": "not an image file"}])
    assert one == "headstart: 1 file skipped: /d/a.jpg (not an image file)"
    many = skipped_summary([{"path": f"/d/{index}.jpg", "reason": "cannot decode"} for index in range(8)])
    assert many.startswith("headstart: 8 files skipped: /d/0.jpg (cannot decode); /d/1.jpg")
    assert "/d/4.jpg" in many and "/d/5.jpg" not in many and many.endswith("; and 3 more") and "\n" not in many


def test_listing_agrees_with_rglob(tmp_path):
    root = tmp_path / "data"
    for relative in (
        "red/a.png",
        "red/A.PNG",
        "red/b/y.png",
        "red/b-c/x.png",
        "red/b.c/w.png",
        "red/.hidden/z.png",
        "red/.h.png",
        "elsewhere/t.png",
        "elsewhere/deep/u.png",
    ):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(b"")
    (root / "red" / "linked-folder").symlink_to(root / "elsewhere")
    (root / "red" / "absolute.png").symlink_to(root / "elsewhere" / "t.png")
    (root / "red" / "relative.png").symlink_to(Path("..") / "elsewhere" / "deep" / "u.png")
    (root / "red" / "chained.png").symlink_to(root / "red" / "relative.png")
    (root / "red" / "broken.png").symlink_to(root / "nowhere.png")

    listed = [path for path, _, _ in list_class_files(root, ["red"], DataReport(source=str(root), class_names=["red"]))]
    by_rglob = [
        path
        for path in sorted((root / "red").rglob("*"))
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(root).parts)
    ]
    assert listed == by_rglob
    assert {str(path.relative_to(root / "red")) for path in listed} == {
        "a.png",
        "A.PNG",
        "b/y.png",
        "b-c/x.png",
        "b.c/w.png",
        "absolute.png",
        "relative.png",
        "chained.png",
    }


def test_splits_depend_on_content_only(colour_folder, tmp_path):
    config = _config(tmp_path, data=str(colour_folder), test_fraction=0.25, validation_fraction=0.25)
    first = source_of(config)[0].read().to_pydict()
    write_class_images(colour_folder, {"red": (190, 50, 50)}, per_class=10, seed=7)  # overwrites 000-009 of red
    for path in sorted((colour_folder / "blue").glob("*.png"))[:5]:
        path.rename(path.with_name("renamed-" + path.name))
    second = source_of(config)[0].read().to_pydict()
    before = dict(zip(first["sha256"], first["split"]))
    after = dict(zip(second["sha256"], second["split"]))
    shared = set(before) & set(after)
    assert len(shared) >= 30
    assert all(before[h] == after[h] for h in shared)


def test_split_assignment_is_uniform():
    hashes = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(20000)]
    splits = [assign_split(h, 0.1, 0.2) for h in hashes]
    assert abs(splits.count("test") / 20000 - 0.2) < 0.015
    assert abs(splits.count("validation") / 20000 - 0.1) < 0.015


def test_missing_and_unknown_classes_are_errors(colour_folder, tmp_path):
    with pytest.raises(HeadstartError, match="green"):
        source_of(_config(tmp_path, data=str(colour_folder), classes=("red", "green")))
    with pytest.raises(HeadstartError, match="not found"):
        source_of(_config(tmp_path, data=str(tmp_path / "nowhere")))


def test_a_folder_without_usable_images_is_an_error(tmp_path):
    for name in ("a", "b"):
        (tmp_path / "data" / name).mkdir(parents=True)
        (tmp_path / "data" / name / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(HeadstartError, match="no usable images"):
        source_of(_config(tmp_path, data=str(tmp_path / "data")))


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((10, 20, 3), np.uint8)
    pixels[:, :10] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    Image.fromarray(pixels).save(tmp_path / "rotated.jpg", exif=exif)
    assert load_image(tmp_path / "rotated.jpg").shape == (20, 10, 3)


# --- CIFAR-10 in its real format, served from 127.0.0.1 ---------------------------------------


def _cifar_batch(labels: list[int], seed: int) -> bytes:
    generator = np.random.default_rng(seed)
    data = generator.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
    return pickle.dumps(
        {b"batch_label": b"batch", b"labels": labels, b"data": data, b"filenames": [b"x.png"] * len(labels)}, protocol=2
    )


def make_cifar_archive(path, per_batch: int = 20) -> None:
    """A miniature cifar-10-python.tar.gz: same members, same pickled dicts, fewer images."""
    with tarfile.open(path, "w:gz") as tar:

        def add(name, data):
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for index in range(1, 6):
            add(f"data_batch_{index}", _cifar_batch([i % 10 for i in range(per_batch)], index))
        add("test_batch", _cifar_batch([i % 10 for i in range(per_batch)], 99))
        add("batches.meta", pickle.dumps({b"label_names": [c.encode() for c in CIFAR10_CLASSES]}, protocol=2))


def test_cifar10_downloaded_from_a_local_server(tmp_path, serve_directory):
    site = tmp_path / "site"
    site.mkdir()
    make_cifar_archive(site / "cifar-10-python.tar.gz")
    url = serve_directory(site) + "/cifar-10-python.tar.gz"
    manifest, report = source_of(_config(tmp_path, data="cifar10", cifar10_source=url))
    table = manifest.read().to_pydict()
    assert manifest.class_names == ("cat", "dog")
    assert report.counts["test"] == {"cat": 2, "dog": 2}  # the official test batch, 2 of each
    assert sum(report.counts["train"].values()) + sum(report.counts["validation"].values()) == 20
    assert any("not the official" in note for note in report.notes)
    first_cat = next(
        p for p, c, s in zip(table["path"], table["class_name"], table["split"]) if c == "cat" and s == "test"
    )
    assert load_image(first_cat).shape == (32, 32, 3)


def test_cifar10_from_a_local_archive_with_other_classes(tmp_path):
    make_cifar_archive(tmp_path / "cifar.tar.gz")
    manifest, _ = source_of(
        _config(
            tmp_path, data="cifar10", cifar10_source=str(tmp_path / "cifar.tar.gz"), classes=("ship", "truck", "frog")
        )
    )
    assert manifest.class_names == ("ship", "truck", "frog")
    with pytest.raises(HeadstartError, match="unknown CIFAR-10 class"):
        source_of(
            _config(tmp_path, data="cifar10", cifar10_source=str(tmp_path / "cifar.tar.gz"), classes=("cat", "unicorn"))
        )


def test_cifar10_batch_with_code_is_refused(tmp_path):
    marker = tmp_path / "the-command-ran"
    evil = RunsACommand(f"touch {marker}")

    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        data = pickle.dumps({b"data": evil, b"labels": []}, protocol=2)
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(HeadstartError, match="refusing"):
        source_of(_config(tmp_path, data="cifar10", cifar10_source=str(archive)))
    assert not marker.exists()


@pytest.mark.parametrize(
    "labels, problem",
    [
        ([0, 10], "label 10 is not one of the 10 classes"),
        ([0, -1], "label -1 is not one of the 10 classes"),
        ([0], "a batch has 2 images but 1 labels"),
    ],
)
def test_cifar10_batch_with_impossible_labels_is_refused(labels, problem, tmp_path):
    archive = tmp_path / "bad-labels.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        data = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": labels}, protocol=2)
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(HeadstartError, match=f"not a readable CIFAR-10 python archive: {problem}$"):
        source_of(_config(tmp_path, data="cifar10", cifar10_source=str(archive)))


def test_download_retries_transient_failures(tmp_path, serve_directory):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "file.bin").write_bytes(b"payload")
    calls = []

    class Flaky(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            calls.append(self.path)
            if len(calls) < 3:
                self.send_error(503)
            else:
                super().do_GET()

    url = serve_directory(tmp_path / "site", Flaky) + "/file.bin"
    target = download(url, tmp_path / "out" / "file.bin", policy=DownloadPolicy(backoff_seconds=0.01))
    assert target.read_bytes() == b"payload"
    assert len(calls) == 3


def test_download_gives_up_with_a_clear_error_and_no_partial_file(tmp_path, serve_directory):
    (tmp_path / "site").mkdir()
    url = serve_directory(tmp_path / "site") + "/missing.tar.gz"
    with pytest.raises(HeadstartError, match="could not download"):
        download(url, tmp_path / "out" / "missing.tar.gz", policy=DownloadPolicy(backoff_seconds=0.01))
    assert not list((tmp_path / "out").glob("*"))
