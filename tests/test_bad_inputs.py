"""Every kind of bad input in one generated folder (tests/bad_inputs.py), through the real path:
scan → decode → extract for each file, and `headstart train`, `evaluate` and `predict` on the
whole folder. Each file either trains (decoded to RGB, rotated by its EXIF orientation) or is
skipped with its reason in the data report; a dataset that cannot train stops with one line
and exit code 2. Nothing raises a traceback, nothing is dropped silently."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from bad_inputs import SKIPPED, TRAINS, encoded, rgb, write_corpus
from servers import PROJECT, prefect_env

AS_ROOT = os.geteuid() == 0  # root reads a file whatever its permissions say


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "data")


@pytest.fixture(scope="module")
def scanned(corpus, tmp_path_factory):
    """The corpus's manifest and data report, as `train`'s download step builds them."""
    from configs import source_of

    from headstart.config import TrainConfig

    config = TrainConfig(data=str(corpus), classes=("cat", "dog"), cache_dir=tmp_path_factory.mktemp("cache"))
    return source_of(config)


def _relative(corpus: Path, path: str) -> str:
    """A listed path as the corpus names it: relative to cat/, or dog/NAME."""
    relative = Path(path).relative_to(corpus)
    return str(relative.relative_to("cat")) if relative.parts[0] == "cat" else str(relative)


def _trained(corpus: Path, manifest) -> dict[str, str]:
    """The corpus's name of each manifest path (which has its symlinks resolved) → that path."""
    names = {
        os.path.realpath(os.path.join(folder, name)): _relative(corpus, os.path.join(folder, name))
        for folder, _, files in os.walk(corpus)
        for name in files
        if os.path.exists(os.path.join(folder, name))
    }
    return {names[path]: path for path in manifest.read().column("path").to_pylist()}


@pytest.mark.parametrize("name", [name for name in TRAINS if name != "unreadable.png" or AS_ROOT])
def test_this_file_trains_decoded_to_rgb(name, corpus, scanned):
    from headstart.data.preprocessing import decoded_batches

    manifest, report = scanned
    paths = _trained(corpus, manifest)
    assert name in paths, (
        f"{name} is not in the manifest; the report says {[s for s in report.skipped if name in s['path']]}"
    )
    (batch,) = list(decoded_batches([paths[name]], 32, 8))
    (image,) = batch.images
    assert image.ndim == 3 and image.shape[2] == 3 and np.isfinite(image).all()


def test_decoding_keeps_what_the_file_means(corpus):
    from headstart.data.images import load_image

    cat = corpus / "cat"
    assert load_image(cat / "rotated.jpg").shape == (60, 30, 3)  # stored 60 wide, 30 high; EXIF rotates it upright
    sixteen = load_image(cat / "sixteen-bit.png")
    assert 100 < sixteen.mean() < 150 and sixteen.max() < 255  # its top 8 bits, not clipped to white
    np.testing.assert_array_equal(load_image(cat / "sixteen-bit-gray.tiff"), sixteen)
    np.testing.assert_array_equal(
        load_image(cat / "animated.gif"), np.asarray(rgb(7).quantize().convert("RGB"))
    )  # the first frame
    assert load_image(cat / "gray.jpg").shape == (40, 40, 3) and load_image(cat / "cmyk.jpg").shape == (40, 40, 3)


@pytest.mark.parametrize("name", list(SKIPPED) + ([] if AS_ROOT else ["unreadable.png"]))
def test_this_file_is_skipped_with_its_reason(name, corpus, scanned):
    _, report = scanned
    reasons = {_relative(corpus, entry["path"]): entry["reason"] for entry in report.skipped}
    assert name in reasons, f"{name} neither trained nor reported: {sorted(reasons)}"
    expected = SKIPPED.get(name, "ermission")
    assert expected.lower() in reasons[name].lower() and "\n" not in reasons[name]


def test_the_decompression_bomb_is_refused_before_decoding_with_the_limit_named(corpus, scanned):
    _, report = scanned
    (reason,) = [entry["reason"] for entry in report.skipped if entry["path"].endswith("bomb.png")]
    assert "3600000000 pixels" in reason and "limit of" in reason


def test_every_file_of_the_corpus_is_accounted_for(corpus, scanned):
    manifest, report = scanned
    trained = set(_trained(corpus, manifest))
    skipped = {_relative(corpus, entry["path"]) for entry in report.skipped}
    on_disk = {
        _relative(corpus, os.path.join(folder, name).encode("utf-8", "backslashreplace").decode())
        for folder, _, names in os.walk(corpus / "cat")
        for name in names
    } | {f"dog/{p.name}" for p in (corpus / "dog").iterdir()}
    assert on_disk - trained - skipped == {"loop-b.jpg"} - skipped  # both links of the loop are reported
    assert not trained & skipped


@pytest.mark.e2e
def test_train_evaluate_and_predict_on_the_corpus_end_without_a_traceback(corpus, tiny_backbone_dir, tmp_path):
    places = ["--artifacts-root", str(tmp_path / "artifacts"), "--cache-dir", str(tmp_path / "cache")]

    def headstart(*args: str) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [sys.executable, "-m", "flows.cli", *args],
            cwd=PROJECT,
            capture_output=True,
            text=True,
            timeout=600,
            env=prefect_env(tmp_path / "prefect"),
        )
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
        return result

    trained = headstart(
        "train",
        "--data",
        str(corpus),
        "--classes",
        "cat,dog",
        "--backbone",
        str(tiny_backbone_dir),
        "--image-size",
        "32",
        "--epochs",
        "2",
        "--no-gate",
        *places,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    # The files left out, at WARNING in one line: how many, and the first five.
    (skipped,) = [line for line in trained.stderr.splitlines() if "WARNING" in line and " files skipped: " in line]
    count = int(re.search(r"headstart: (\d+) files skipped: ", skipped)[1])
    assert count > 5 and skipped.endswith(f"; and {count - 5} more")
    run = trained.stdout.strip().splitlines()[-1]
    evaluated = headstart("evaluate", "--model", run, "--data", str(corpus))
    assert evaluated.returncode == 0 and "files skipped" in evaluated.stdout
    predicted = headstart("predict", "--model", run, str(corpus / "cat"), *places)
    assert predicted.returncode == 0 and predicted.stderr.count("headstart: skipped") >= len(
        [n for n in SKIPPED if not n.startswith("dog/")]
    )
    # Without --classes the empty folder is a class with no images: one line, exit code 2.
    empty = headstart(
        "train", "--data", str(corpus), "--backbone", str(tiny_backbone_dir), "--image-size", "32", *places
    )
    errors = [line for line in empty.stderr.splitlines() if line.startswith("headstart: error:")]
    assert (
        empty.returncode == 2
        and len(errors) == 1
        and errors[0].startswith("headstart: error: class 'empty-class' has no usable")
    )


def test_an_image_that_changes_between_scan_and_decode_is_left_out_and_never_cached_under_its_old_hash(
    colour_folder, tiny_backbone_dir, tmp_path
):
    """Rewritten with other pixels, truncated, or removed after the scan hashed it: each file is
    left out of the run with its reason, and no features are cached under a hash its file no
    longer has; the next scan takes the rewritten file's new content."""
    from configs import source_of

    from headstart.backbone.handles import resolve_backbone
    from headstart.config import TrainConfig
    from headstart.data.manifest import without_images
    from headstart.features.cache import FeatureCache
    from headstart.features.dataset import assemble_features, plan_extraction
    from headstart.features.extraction import ExtractionContext, ExtractionSettings
    from headstart.infra.storage import file_sha256

    config = TrainConfig(data=str(colour_folder), cache_dir=tmp_path / "cache")
    backbone = resolve_backbone(str(tiny_backbone_dir), 32, config.runtime.cache_dir)
    manifest, report = source_of(config)
    scanned = dict(zip(manifest.read().column("path").to_pylist(), manifest.read().column("sha256").to_pylist()))
    rewritten, truncated, removed = sorted(scanned)[:3]
    rgb(999, (32, 32)).save(rewritten, format="PNG")
    Path(truncated).write_bytes(Path(truncated).read_bytes()[:60])
    Path(removed).unlink()

    with ExtractionContext(config.runtime.cache_dir, ExtractionSettings("keras", batch_size=5)) as context:
        (shard,) = plan_extraction(manifest, backbone, config.runtime.cache_dir)
        extracted = context.extract_shard(shard, backbone)
    reasons = {path: reason for _, path, reason in extracted.left_out}
    assert set(reasons) == {rewritten, truncated, removed} and extracted.extracted == len(scanned) - 3
    assert (
        reasons[rewritten].startswith("changed after it was scanned")
        and "changed after it was scanned" in reasons[truncated]
    )
    assert "could not be read" in reasons[removed] and "FileNotFoundError" in reasons[removed]
    assert FeatureCache(config.runtime.cache_dir, backbone).cached_hashes() == set(scanned.values()) - {
        scanned[p] for p in reasons
    }

    smaller, report = without_images(manifest, report, list(extracted.left_out), config.runtime.cache_dir)
    assert smaller.fingerprint != manifest.fingerprint and smaller.read().num_rows == len(scanned) - 3
    assert {entry["path"] for entry in report.skipped} == set(reasons)
    assert sum(sum(counts.values()) for counts in report.counts.values()) == len(scanned) - 3
    assert assemble_features(smaller, backbone, config.runtime.cache_dir).load()[0].shape[0] == len(scanned) - 3

    again, _ = source_of(config)
    hashes = dict(zip(again.read().column("path").to_pylist(), again.read().column("sha256").to_pylist()))
    assert (
        hashes[rewritten] == file_sha256(Path(rewritten)) != scanned[rewritten]
        and truncated not in hashes
        and removed not in hashes
    )


def _images_landing_in(split: str, count: int, first_seed: int) -> list[bytes]:
    """PNG files whose content hash the default split sends to `split`: found by trying seeds in order."""
    import hashlib

    from headstart.data.manifest import assign_split

    found, seed = [], first_seed
    while len(found) < count:
        data = encoded(rgb(seed), "PNG")
        if assign_split(hashlib.sha256(data).hexdigest(), 0.1, 0.1) == split:
            found.append(data)
        seed += 1
    return found


def _two_class_folder(root: Path, small_class: list[bytes]) -> Path:
    for index, data in enumerate(_images_landing_in("train", 6, 500) + _images_landing_in("test", 2, 600)):
        (root / "big").mkdir(parents=True, exist_ok=True)
        (root / "big" / f"{index}.png").write_bytes(data)
    (root / "small").mkdir()
    for index, data in enumerate(small_class):
        (root / "small" / f"{index}.png").write_bytes(data)
    return root


def test_a_class_too_small_to_split_stops_with_one_line_or_trains_with_a_note(tmp_path):
    from configs import source_of

    from headstart.config import TrainConfig
    from headstart.errors import HeadstartError

    none_in_training = _two_class_folder(
        tmp_path / "a", _images_landing_in("test", 1, 700) + _images_landing_in("validation", 1, 800)
    )
    with pytest.raises(HeadstartError) as stopped:
        source_of(TrainConfig(data=str(none_in_training), cache_dir=tmp_path / "cache"))
    message = str(stopped.value)
    assert message.startswith("class 'small' has 2 usable images in") and message.endswith(
        "put none in training: give it more images"
    )

    none_in_test = _two_class_folder(tmp_path / "b", _images_landing_in("train", 2, 900))
    manifest, report = source_of(TrainConfig(data=str(none_in_test), cache_dir=tmp_path / "cache"))
    assert report.counts["train"]["small"] == 2 and report.counts["test"]["small"] == 0
    assert report.notes == [
        "class 'small' has no test images (of its 2): its test metrics are not measured; give it more images"
    ]


def test_the_same_image_twice_trains_once_and_never_in_two_splits(tmp_path):
    """Splits follow the content hash, so a copy can only land where its original is; with fixed
    splits (CIFAR-10's official test set), a test image identical to a training image is skipped."""
    from headstart.data.manifest import DataReport, build_manifest

    (tmp_path / "a").mkdir()
    original, copy, official_test = tmp_path / "a" / "x.png", tmp_path / "a" / "x-copy.png", tmp_path / "a" / "t.png"
    for path in (original, copy, official_test):
        rgb(1).save(path)
    other = tmp_path / "a" / "y.png"
    rgb(2).save(other)
    report = DataReport(source="test", class_names=["a"])
    files = [(original, 0, "train"), (other, 0, "test"), (copy, 0, "train"), (official_test, 0, "test")]
    table = build_manifest(files, ["a"], report, tmp_path / "cache", 0.0, 0.1).read().to_pydict()
    assert table["path"] == [str(original), str(other)] and table["split"] == ["train", "test"]
    assert {Path(entry["path"]).name: entry["reason"] for entry in report.skipped} == {
        "x-copy.png": f"duplicate of {original}",
        "t.png": f"duplicate of {original}",
    }


@pytest.mark.skipif(
    not AS_ROOT, reason="as another user than root the corpus test above already finds the unreadable file skipped"
)
def test_a_file_without_read_permission_is_skipped_with_its_reason_where_permissions_apply(tmp_path):
    """Root reads any file through its capabilities CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, so the
    scan runs in a child process without them, as a worker under a service account would."""
    import json
    import shutil

    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed to drop root's file-access capabilities")
    for name in ("a", "b"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for index in range(12):
            rgb(index + (100 if name == "b" else 0)).save(tmp_path / "data" / name / f"{index}.png")
    os.chmod(tmp_path / "data" / "a" / "0.png", 0)
    script = (
        "import json; from pathlib import Path; from headstart.config import TrainConfig; "
        "from headstart.data.sources import prepare_source; "
        "from headstart.serving.predict import list_images; "
        f"config = TrainConfig(data={str(tmp_path / 'data')!r}, cache_dir={str(tmp_path / 'cache')!r}); "
        "print(json.dumps(prepare_source(config.data, config.runtime.cache_dir)[1].skipped "
        f"+ list_images([Path({str(tmp_path / 'data' / 'a')!r})])[1]))"
    )
    result = subprocess.run(
        ["setpriv", "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-c", script],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    scanned, listed_for_predict = json.loads(result.stdout.strip().splitlines()[-1])
    for entry in (scanned, listed_for_predict):  # train's scan and predict's check give the same reason
        assert entry["path"].endswith("a/0.png") and entry["reason"] == "cannot read: Permission denied"


def test_a_file_gone_between_listing_and_scanning_is_skipped_with_its_reason(tmp_path):
    from headstart.data.manifest import scan_files

    rgb(1).save(tmp_path / "here.png")
    (here, _), gone = scan_files([str(tmp_path / "here.png"), str(tmp_path / "gone.png")], tmp_path / "cache")
    assert len(here) == 64 and gone == ("", "cannot read: No such file or directory")


@pytest.mark.parametrize("classes", [["cat"], []], ids=["one class folder", "no class folder"])
def test_a_dataset_of_fewer_than_two_classes_stops_with_one_line_and_exit_code_2(classes, tmp_path):
    for name in classes:
        (tmp_path / "data" / name).mkdir(parents=True)
        for index in range(3):
            rgb(index).save(tmp_path / "data" / name / f"{index}.png")
    (tmp_path / "data").mkdir(exist_ok=True)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "train",
            "--data",
            str(tmp_path / "data"),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--artifacts-root",
            str(tmp_path / "artifacts"),
        ],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=300,
        env=prefect_env(tmp_path / "prefect"),
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("headstart: error:")]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert errors == [
        f"headstart: error: {tmp_path / 'data'} needs at least two class sub-folders of images, found {len(classes)}"
    ]
    assert not (tmp_path / "artifacts").exists() or not any((tmp_path / "artifacts").iterdir())
