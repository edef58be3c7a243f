"""Attacks through the cache directory: a garbled assembled dataset, LiteRT model, reuse index or
scan cache (truncated, overwritten with random bytes, emptied, or a well-formed file of another
shape). Each is dropped with one warning naming it and rebuilt from its sources, and the run
completes with the results it had before."""

from __future__ import annotations

import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from configs import smoke_config, source_of
from conftest import extract_dataset, write_class_images

from headstart.backbone.handles import fingerprint_module, resolve_backbone
from headstart.config import TrainConfig
from headstart.features.cache import FeatureCache
from headstart.features.dataset import dataset_features_path
from headstart.features.engines import _litert_model_path, _parity_record, choose_engine
from headstart.features.extraction import ExtractionContext, ExtractionSettings
from headstart.registry.reuse import _index_entry, find_identical_run, record_run

VARIANTS = ["truncated", "random bytes", "empty", "a flipped byte"]


def garble(path: Path, variant: str, replacement: bytes = b"") -> None:
    """Damages a file as a disk, a crash of another tool or a careless hand would."""
    data = path.read_bytes()
    if variant == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif variant == "random bytes":
        path.write_bytes(np.random.default_rng(7).bytes(max(len(data), 64)))
    elif variant == "empty":
        path.write_bytes(b"")
    elif variant == "a flipped byte":  # in the middle: inside the data, headers and footers intact
        data = bytearray(data)
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    else:  # a well-formed file of another shape
        path.write_bytes(replacement)


def warnings_naming(caplog, path: Path) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.levelno == logging.WARNING and str(path) in record.getMessage()
    ]


def _parquet_bytes(table: pa.Table, tmp_path: Path) -> bytes:
    pq.write_table(table, tmp_path / "other.parquet")
    return (tmp_path / "other.parquet").read_bytes()


@pytest.fixture
def tiny(tiny_backbone_dir, tmp_path):
    return resolve_backbone(str(tiny_backbone_dir), 32, tmp_path / "cache")


def _manifest(folder, tmp_path):
    return source_of(TrainConfig(data=str(folder), cache_dir=tmp_path / "cache"))[0]


@pytest.mark.parametrize("variant", [*VARIANTS, "another dataset's file", "with a damaged shard"])
def test_garbled_assembled_dataset(variant, colour_folder, tiny, tmp_path, caplog):
    """A garbled assembled dataset (`<cache>/datasets/*.parquet`): dropped and assembled again,
    its damaged shards extracted again."""
    context = ExtractionContext(tmp_path / "cache", ExtractionSettings("keras", batch_size=8))
    manifest = _manifest(colour_folder, tmp_path)
    first = extract_dataset(manifest, tiny, context, shard_size=16)
    expected = first.load()
    assert first.path == dataset_features_path(manifest, tiny, tmp_path / "cache")
    other = _parquet_bytes(pa.table({"path": ["a"], "features": [b"x"]}), tmp_path)
    garble(first.path, "truncated" if variant == "with a damaged shard" else variant, other)
    shard = FeatureCache(tmp_path / "cache", tiny).shard_paths()[1]
    if variant == "with a damaged shard":
        garble(shard, "random bytes")

    with caplog.at_level(logging.WARNING, logger="headstart"):
        again = extract_dataset(manifest, tiny, context, shard_size=16)
        again_also = extract_dataset(manifest, tiny, context, shard_size=16)  # healed: no more warnings

    assert again.path == first.path and again_also.extracted == 0
    assert (again.extracted, again.reused) == ((16, 32) if variant == "with a damaged shard" else (0, 48))
    assert len(warnings_naming(caplog, first.path)) == 1
    assert len(warnings_naming(caplog, shard)) == (variant == "with a damaged shard")
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1 + (variant == "with a damaged shard")
    loaded = again.load()
    assert loaded[2] == expected[2]
    np.testing.assert_array_equal(loaded[0], expected[0])
    np.testing.assert_array_equal(loaded[1], expected[1])


def test_assembled_dataset_garbled_during_a_run(colour_folder, tiny, tmp_path):
    """A garbled assembled dataset, damaged after the run checked it: the read that meets the damage
    stops the run in one line (no wrong numbers), the file is dropped, and the next run heals."""
    from headstart.errors import HeadstartError

    context = ExtractionContext(tmp_path / "cache", ExtractionSettings("keras", batch_size=8))
    manifest = _manifest(colour_folder, tmp_path)
    features = extract_dataset(manifest, tiny, context)
    expected = features.load()
    garble(features.path, "a flipped byte")
    with pytest.raises(HeadstartError, match="damaged during the run .*run again") as error:
        list(features.stream("train").chunks())
    assert str(features.path) in str(error.value) and "\n" not in str(error.value)
    assert not features.path.exists()
    healed = extract_dataset(manifest, tiny, context)
    np.testing.assert_array_equal(healed.load()[0], expected[0])


@pytest.mark.parametrize("variant", [*VARIANTS, "a parity record that is a list", "a parity record cut short"])
def test_garbled_litert_model(variant, tiny, tmp_path, caplog):
    """A garbled cached LiteRT model (`<cache>/litert/*.tflite`): verified when loaded, dropped and
    converted again."""
    cache_dir = tmp_path / "cache"
    images = np.random.default_rng(0).random((3, 32, 32, 3), dtype=np.float32)
    expected = choose_engine(tiny, "litert", cache_dir, threads=1).engine(images)
    model = _litert_model_path(tiny, cache_dir)
    record = _parity_record(model)
    if variant == "a parity record that is a list":
        garble(record, "other", b"[0.0]")
        damaged = record
    elif variant == "a parity record cut short":
        garble(record, "truncated")
        damaged = record
    else:
        garble(model, variant)
        damaged = model

    with caplog.at_level(logging.WARNING, logger="headstart"):
        choice = choose_engine(tiny, "litert", cache_dir, threads=1)
        features = choice.engine(images)
        choose_engine(tiny, "litert", cache_dir, threads=1)  # healed: no more warnings

    assert choice.engine.name == "litert"
    assert len(warnings_naming(caplog, damaged)) == 1
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1
    np.testing.assert_array_equal(features, expected)
    assert json.loads(record.read_text())["bytes"] == model.stat().st_size


@pytest.mark.parametrize("variant", [*VARIANTS, "a record that is a list"])
def test_garbled_quantized_litert_backbone(variant, colour_folder, tiny, tmp_path, caplog):
    """A garbled cached int8 LiteRT backbone (`<cache>/litert/*-int8-*.tflite`): verified when
    loaded, dropped and quantized again."""
    import hashlib

    from headstart.edge import quantized_backbone
    from headstart.features.engines import LiteRTEngine

    rows = [
        {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "split": "train"}
        for path in sorted(colour_folder.glob("*/*.png"))[:12]
    ]
    images = np.random.default_rng(0).random((3, 32, 32, 3), dtype=np.float32)
    first = quantized_backbone(tiny, rows, tmp_path / "cache")
    expected = LiteRTEngine(first, tmp_path / "cache", 1)(images)
    record = first.litert_model.with_suffix(".json")
    damaged = record if variant == "a record that is a list" else first.litert_model
    garble(damaged, variant, b"[]")

    with caplog.at_level(logging.WARNING, logger="headstart"):
        again = quantized_backbone(tiny, rows, tmp_path / "cache")
        quantized_backbone(tiny, rows, tmp_path / "cache")  # healed: no more warnings

    assert again == first
    assert len(warnings_naming(caplog, damaged)) == 1 and len(caplog.records) == 1
    np.testing.assert_array_equal(LiteRTEngine(again, tmp_path / "cache", 1)(images), expected)


@pytest.mark.parametrize(
    "variant", [*VARIANTS, "a JSON list", "run_dirs not a list", "an empty object", "an earlier layout"]
)
def test_garbled_reuse_index(variant, tmp_path, caplog):
    """A garbled reuse index (`<cache>/runs/*.json`): dropped with a warning, treated as no earlier run."""
    cache_dir, key = tmp_path / "cache", "k" * 20
    run_dir = tmp_path / "artifacts" / "20260101-000000-aaaa"
    record_run(cache_dir, key, run_dir)
    entry = _index_entry(cache_dir, key)
    replacement = {
        "a JSON list": b'["/a/run"]',
        "run_dirs not a list": b'{"run_dirs": 5}',
        "an empty object": b"{}",
        "an earlier layout": json.dumps({"run_dir": str(tmp_path / "old" / "run")}).encode(),
    }.get(variant, b"")
    garble(entry, variant, replacement)

    with caplog.at_level(logging.WARNING, logger="headstart"):
        assert find_identical_run(cache_dir, key, tmp_path / "artifacts") is None
        record_run(cache_dir, key, run_dir)

    held = json.loads(entry.read_text())["run_dirs"]
    if variant == "an earlier layout":  # still read, and kept beside the new run
        assert held == [str(tmp_path / "old" / "run"), str(run_dir)] and not caplog.records
    elif variant == "a flipped byte":  # well-formed, naming a run directory that is not there: no earlier run
        assert held[-1] == str(run_dir) and not caplog.records
    else:
        assert held == [str(run_dir)]
        assert len(warnings_naming(caplog, entry)) == 1 and len(caplog.records) == 1


@pytest.mark.parametrize(
    "variant", [*VARIANTS, "a table of other columns", "a flipped hash byte", "hashes that are not SHA-256s"]
)
def test_garbled_scan_cache(variant, colour_folder, tmp_path, caplog):
    """A garbled scan cache (`<cache>/scan-cache.parquet`): dropped, its files scanned again."""
    config = TrainConfig(data=str(colour_folder), cache_dir=tmp_path / "cache")
    manifest, report = source_of(config)
    scan_cache = tmp_path / "cache" / "scan-cache.parquet"
    expected = manifest.read()
    if variant == "a flipped hash byte":  # inside a page: its checksum fails, no image takes another's hash
        data = bytearray(scan_cache.read_bytes())
        first_hash = expected.column("sha256")[0].as_py().encode()
        data[data.index(first_hash) + 3] ^= 0x01
        scan_cache.write_bytes(bytes(data))
    elif variant == "hashes that are not SHA-256s":  # the right columns and types, but no file's hash
        table = pq.read_table(scan_cache)
        hashes = pa.array(["0"] * table.num_rows)
        garble(scan_cache, "other", _parquet_bytes(table.set_column(3, "sha256", hashes), tmp_path))
    else:
        garble(scan_cache, variant, _parquet_bytes(pa.table({"path": ["x"], "sha256": [5]}), tmp_path))

    with caplog.at_level(logging.WARNING, logger="headstart"):
        again, again_report = source_of(config)
        source_of(config)  # healed: no more warnings

    assert len(warnings_naming(caplog, scan_cache)) == 1 and len(caplog.records) == 1
    assert again.fingerprint == manifest.fingerprint and again.read().equals(expected)
    assert again_report.to_dict() == report.to_dict()


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.mark.parametrize(
    "variant",
    [
        *VARIANTS,
        "a record that is a list",
        "an image removed",
        *(f"an image {damage}" for damage in VARIANTS),
        "an image replaced by another",
        "image hashes that are a list",
    ],
)
def test_garbled_cifar10_extraction(variant, tmp_path, caplog):
    """A garbled CIFAR-10 extraction (`<cache>/cifar10/*/`): its record damaged, an image gone or
    garbled (its content hash is no longer the one written), dropped and extracted again from the
    archive."""
    from test_data import make_cifar_archive

    make_cifar_archive(tmp_path / "cifar.tar.gz")
    archive, cache_dir = str(tmp_path / "cifar.tar.gz"), tmp_path / "cache"
    config = TrainConfig(data="cifar10", cifar10_source=archive, classes=("cat", "dog"), cache_dir=cache_dir)
    manifest, report = source_of(config)
    (root,) = (tmp_path / "cache" / "cifar10").iterdir()
    assert json.loads((root / "complete").read_text()) == {"train": 100, "test": 20}
    if variant == "an image removed":
        next((root / "train" / "cat").glob("*.png")).unlink()
        damaged = root
    elif variant.startswith("an image"):
        damaged = sorted((root / "test" / "cat").glob("*.png"))[0]
        another = sorted((root / "train" / "dog").glob("*.png"))[0].read_bytes()  # a valid image of the other class
        garble(damaged, variant.removeprefix("an image "), another)
    elif variant == "image hashes that are a list":
        damaged = root / "sha256.json"
        garble(damaged, "other", b"[]")
    else:
        garble(root / "complete", variant, b"[100, 20]")
        damaged = root / "complete"

    with caplog.at_level(logging.WARNING, logger="headstart"):
        again, again_report = source_of(config)
        source_of(config)  # healed: no more warnings

    assert len(warnings_naming(caplog, damaged)) == 1 and len(caplog.records) == 1
    assert again.fingerprint == manifest.fingerprint and again_report.to_dict() == report.to_dict()
    assert not list(root.parent.glob(".*"))  # nothing left aside


@pytest.fixture
def hub_url(tiny_backbone_dir, tmp_path, serve_directory) -> str:
    """The tiny backbone as a compressed TF Hub module on a local server."""
    served = tmp_path / "served"
    served.mkdir()
    with tarfile.open(served / "module.tar.gz", "w:gz") as tar:
        for item in sorted(tiny_backbone_dir.iterdir()):
            tar.add(item, arcname=item.name)
    return serve_directory(served) + "/module.tar.gz"


@pytest.mark.parametrize(
    "kind, variant",
    [
        ("downloaded", "saved_model.pb truncated"),
        ("downloaded", "variables overwritten with random bytes"),
        ("downloaded", "saved_model.pb removed"),
        ("downloaded", "a fingerprint record that is a list"),
        ("converted", "saved_model.pb truncated"),
        ("converted", "a fingerprint record that is a list"),
        ("fine-tuned", "saved_model.pb truncated"),
        ("fine-tuned", "variables overwritten with random bytes"),
        ("fine-tuned", "a fingerprint record that is a list"),
    ],
)
def test_garbled_cached_backbone(kind, variant, request, tmp_path, caplog):
    """A garbled converted, downloaded or fine-tuned backbone (`<cache>/backbones/*`,
    `<cache>/tfhub/*`): its fingerprint checked against the one recorded when it was made,
    dropped and made again."""
    from headstart.config import BUNDLED_HANDLE

    cache_dir = tmp_path / "cache"
    if kind == "fine-tuned":  # exported under the run's training key, kept for an identical run
        from headstart.training.fine_tuning import SplitBackbone

        split = SplitBackbone(resolve_backbone(BUNDLED_HANDLE, 32, tmp_path / "bundled"), 14)

        def make():
            return split.export(cache_dir / "backbones" / "fine-tuned-key", "fine-tuned")
    else:
        handle = BUNDLED_HANDLE if kind == "converted" else request.getfixturevalue("hub_url")

        def make():
            return resolve_backbone(handle, 32, cache_dir)

    first = make()
    images = np.random.default_rng(3).random((2, 32, 32, 3), dtype=np.float32)
    features = first.keras_layer()(images).numpy()
    record = first.module_path.with_name(first.module_path.name + ".fingerprint.json")
    assert json.loads(record.read_text()) == {"fingerprint": fingerprint_module(first.module_path)}
    if variant == "saved_model.pb truncated":
        garble(first.module_path / "saved_model.pb", "truncated")
        damaged = first.module_path
    elif variant == "variables overwritten with random bytes":
        garble(next((first.module_path / "variables").glob("*.data-*")), "random bytes")
        damaged = first.module_path
    elif variant == "saved_model.pb removed":
        (first.module_path / "saved_model.pb").unlink()
        damaged = first.module_path
    else:
        garble(record, "other", b"[]")
        damaged = record

    with caplog.at_level(logging.WARNING, logger="headstart"):
        again = make()
        make()  # healed: no more warnings

    assert again.module_path == first.module_path
    # A download is the same bytes again; a conversion writes the same weights in a graph whose
    # ids differ from export to export.
    assert kind == "converted" or again.fingerprint == first.fingerprint
    assert len(warnings_naming(caplog, damaged)) == 1 and len(caplog.records) == 1
    assert json.loads(record.read_text()) == {"fingerprint": fingerprint_module(again.module_path)}
    np.testing.assert_allclose(again.keras_layer()(images).numpy(), features, atol=1e-6)
    assert not list(first.module_path.parent.glob(".*"))  # nothing left aside


def _flow_config(folder, backbone_dir, tmp_path, **overrides):
    values = dict(epochs=10, learning_rate=0.1, batch_size=8, patience=10, test_fraction=0.25, gate=False)
    return smoke_config(
        folder,
        backbone_dir,
        tmp_path,
        **{**values, **overrides},
    )


@pytest.mark.parametrize("variant", ["truncated", "random bytes"])
def test_garbled_caches_in_a_train_run(variant, prefect_harness, colour_folder, tiny_backbone_dir, tmp_path):
    """Every cache kind garbled at once (assembled dataset, a feature shard, LiteRT model, reuse
    index, scan cache) before a train: each dropped with one warning, and the run completes with
    the results of the run before."""
    from flows.train import train

    cache_dir = tmp_path / "cache"
    config = _flow_config(colour_folder, tiny_backbone_dir, tmp_path)
    first = Path(train(**config.flat()))
    damaged = [
        *(cache_dir / "datasets").glob("*.parquet"),
        sorted((cache_dir / "features").glob("*/shard-*.parquet"))[0],
        *(cache_dir / "litert").glob("*.tflite"),
        *(cache_dir / "runs").glob("*.json"),
        cache_dir / "scan-cache.parquet",
    ]
    assert len(damaged) == 5 and all(path.is_file() for path in damaged)
    for path in damaged:
        garble(path, variant)

    # Prefect configures logging again as a flow starts, which removes caplog's handler from the root.
    records = _Records()
    logging.getLogger("headstart").addHandler(records)
    try:
        second = Path(train(**config.flat()))
    finally:
        logging.getLogger("headstart").removeHandler(records)

    assert second != first  # the index no longer named the first run: trained again
    for path in damaged:
        assert len(warnings_naming(records, path)) == 1, path
    assert len(records.records) == len(damaged) and not any(record.exc_info for record in records.records)

    def result(run_dir: Path) -> dict:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        return {key: value for key, value in metrics.items() if not key.startswith(("features_", "engine"))}

    assert result(second) == result(first)
    assert json.loads((second / "history.json").read_text()) == json.loads((first / "history.json").read_text())
    assert json.loads((second / "metrics.json").read_text())["engine"] == "litert"


@pytest.fixture(scope="module")
def trained(prefect_harness, tiny_backbone_dir, tmp_path_factory) -> tuple[Path, Path]:
    """A real run of the flow, and the folder it learnt from."""
    from flows.train import train

    root = tmp_path_factory.mktemp("trained")
    folder = write_class_images(root / "data", {"red": (200, 40, 40), "blue": (40, 40, 200)}, per_class=24)
    return Path(train(**_flow_config(folder, tiny_backbone_dir, root).flat())), folder


@pytest.mark.parametrize("variant", ["truncated", "a flipped byte"])
def test_garbled_litert_model_in_predict(variant, trained, tmp_path, capsys):
    """A garbled cached LiteRT model (`<cache>/litert/*.tflite`) under `headstart predict`: converted
    again, and the predictions are those made before."""
    from flows.cli import main

    run_dir, folder = trained
    args = ["predict", "--model", str(run_dir), str(folder), "--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 0
    before = capsys.readouterr().out
    (model,) = (tmp_path / "cache" / "litert").glob("*.tflite")
    garble(model, variant)

    records = _Records()
    logging.getLogger("headstart").addHandler(records)
    try:
        status = main(args)
    finally:
        logging.getLogger("headstart").removeHandler(records)

    after = capsys.readouterr()
    assert status == 0 and after.out == before and len(before.splitlines()) == 48
    assert "Traceback" not in after.err and "headstart: error" not in after.err
    assert len(records.records) == 1 and len(warnings_naming(records, model)) == 1


def test_a_cache_file_replaced_while_it_was_checked_is_kept(tmp_path, caplog):
    """A garbled cache file that another run replaced while this one checked it: the replacement
    is kept (only what was checked is dropped), and an unreadable file is an error, not damage."""
    from headstart.infra.cache_files import read_or_drop

    path = tmp_path / "entry.json"
    path.write_bytes(b"{garbled")

    def replaced_meanwhile(checked: Path):
        replacement = tmp_path / "replacement.json"
        replacement.write_text("{}")
        replacement.replace(checked)
        raise ValueError("garbled")

    with caplog.at_level(logging.WARNING, logger="headstart"):
        assert read_or_drop(path, replaced_meanwhile, "test entry", "rebuilt") is None
    assert path.read_text() == "{}" and len(warnings_naming(caplog, path)) == 1

    def unreadable(checked: Path):
        raise PermissionError(13, "Permission denied", str(checked))

    with pytest.raises(PermissionError):
        read_or_drop(path, unreadable, "test entry", "rebuilt")
    assert path.is_file()
