"""The feature cache, the backbone and the images on an object store: machines that share only the
store (each its own $XDG_CACHE_HOME), and a Dask worker with its own disk extracting a shard."""

import dataclasses
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from configs import source_of
from conftest import write_class_images

from headstart.backbone.handles import publish_backbone, resolve_backbone, shared_backbone
from headstart.config import TrainConfig
from headstart.data.sources import check_source
from headstart.errors import HeadstartError
from headstart.features.cache import FeatureCache
from headstart.features.dataset import assemble_features, plan_extraction
from headstart.features.extraction import ExtractionContext, ExtractionSettings
from headstart.infra.object_store import ObjectStore, local_copy
from tests.object_stores import store_env
from tests.servers import _stop, free_port

COLOURS = {"red": (200, 30, 30), "blue": (30, 30, 200)}
KERAS = ExtractionSettings("keras", batch_size=8)


@pytest.fixture
def tiny(tiny_backbone_dir, tmp_path):
    return resolve_backbone(str(tiny_backbone_dir), 32, tmp_path / "backbone-cache")


@pytest.fixture
def downloads(monkeypatch):
    """Every object downloaded from a store in this process, by name."""
    seen = []
    original = ObjectStore.download

    def counting(self, name, destination):
        seen.append(name)
        return original(self, name, destination)

    monkeypatch.setattr(ObjectStore, "download", counting)
    return seen


def _machine(monkeypatch, tmp_path, name: str) -> Path:
    """Makes this process another machine: its own cache for copies of what lives on the store."""
    home = tmp_path / f"machine-{name}"
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    return home


def _manifest(data, cache_dir):
    return source_of(TrainConfig(data=str(data), cache_dir=cache_dir))[0]


def test_shards_extracted_on_one_machine_are_read_through_on_another(s3_bucket, tiny, tmp_path, monkeypatch, downloads):
    cache = f"{s3_bucket}/cache"
    manifest = _manifest(write_class_images(tmp_path / "photos", COLOURS, per_class=8), tmp_path / "local")

    _machine(monkeypatch, tmp_path, "a")
    shards = plan_extraction(manifest, tiny, cache, shard_size=6)
    assert sum(map(len, shards)) == 16 and len(shards) == 3
    with ExtractionContext(cache, KERAS) as context:
        extracted = [context.extract_shard(shard, tiny) for shard in shards]
    assert [shard.extracted for shard in extracted] == [6, 6, 4]
    on_store = FeatureCache(cache, tiny).store.listing()
    assert len(on_store) == 3 and all(name.startswith("shard-") for name in on_store)
    features_a = assemble_features(manifest, tiny, cache, 16).load()
    assert downloads == []  # machine A has its own copies already

    _machine(monkeypatch, tmp_path, "b")
    assert plan_extraction(manifest, tiny, cache, shard_size=6) == []
    assert sorted(downloads) == sorted(on_store)  # each shard downloaded once
    features_b = assemble_features(manifest, tiny, cache).load()
    np.testing.assert_array_equal(features_b[0], features_a[0])
    assert FeatureCache(cache, tiny).cached_hashes() == set(manifest.read().column("sha256").to_pylist())
    assert len(downloads) == 3  # a second look downloads nothing


def test_a_damaged_local_copy_of_a_shard_is_dropped_and_fetched_again(
    s3_bucket, tiny, tmp_path, monkeypatch, downloads, caplog
):
    cache = f"{s3_bucket}/cache"
    manifest = _manifest(write_class_images(tmp_path / "photos", COLOURS, per_class=4), tmp_path / "local")
    _machine(monkeypatch, tmp_path, "a")
    with ExtractionContext(cache, KERAS) as context:
        for shard in plan_extraction(manifest, tiny, cache, shard_size=4):
            context.extract_shard(shard, tiny)

    _machine(monkeypatch, tmp_path, "b")
    hashes = FeatureCache(cache, tiny).cached_hashes()
    assert len(hashes) == 8 and len(downloads) == 2
    damaged = FeatureCache(cache, tiny).shard_paths()[0]
    data = damaged.read_bytes()[: damaged.stat().st_size // 2]
    damaged.write_bytes(data)
    with caplog.at_level(logging.WARNING, logger="headstart"):
        assert FeatureCache(cache, tiny).cached_hashes() == hashes
    assert downloads[2:] == [damaged.name]  # only the damaged one, once
    assert "feature cache shard" in caplog.text and str(damaged) in caplog.text
    assert plan_extraction(manifest, tiny, cache, shard_size=4) == []

    # Where the store lost it too, the images are extracted again, and the shard written back.
    FeatureCache(cache, tiny).store.remove(damaged.name)
    damaged.write_bytes(data)
    (shard,) = plan_extraction(manifest, tiny, cache, shard_size=4)
    with ExtractionContext(cache, KERAS) as context:
        assert context.extract_shard(shard, tiny).extracted == 4
    assert FeatureCache(cache, tiny).store.exists(damaged.name)


def _upload_photos(url: str, folder: Path) -> None:
    store = ObjectStore(url)
    for path in sorted(folder.rglob("*.png")):
        store.upload(path, path.relative_to(folder).as_posix())


def test_images_on_the_store_make_the_same_manifest_on_every_machine(s3_bucket, tmp_path, monkeypatch, downloads):
    url = f"{s3_bucket}/photos"
    _upload_photos(url, write_class_images(tmp_path / "photos", COLOURS, per_class=6))
    check_source(TrainConfig(data=url, cache_dir=tmp_path).data)

    _machine(monkeypatch, tmp_path, "a")
    manifest_a = _manifest(url, tmp_path / "a-cache")
    assert len(downloads) == 12
    paths = manifest_a.read().column("path").to_pylist()
    assert all(path.startswith(f"{url}/red/") or path.startswith(f"{url}/blue/") for path in paths)
    _machine(monkeypatch, tmp_path, "b")
    manifest_b = _manifest(url, tmp_path / "b-cache")
    assert manifest_b.fingerprint == manifest_a.fingerprint
    assert manifest_b.read().equals(manifest_a.read())

    # A second copy fetches only what changed on the store.
    write_class_images(tmp_path / "changed", {"red": (250, 250, 0)}, per_class=1)
    ObjectStore(url).upload(tmp_path / "changed" / "red" / "000.png", "red/000.png")
    downloads.clear()
    manifest_b2 = _manifest(url, tmp_path / "b-cache")
    assert downloads == ["red/000.png"]
    assert manifest_b2.fingerprint != manifest_b.fingerprint


def test_a_store_folder_that_holds_nothing_is_one_line(s3_bucket):
    config = TrainConfig(data=f"{s3_bucket}/no-such-photos", cache_dir=Path("unused"))
    with pytest.raises(HeadstartError, match=r"data folder not found: s3://.*/no-such-photos") as error:
        check_source(config.data)
    assert "\n" not in str(error.value)


def test_a_machine_with_no_copy_runs_the_published_backbone_on_store_images(s3_bucket, tiny, tmp_path, monkeypatch):
    url, cache = f"{s3_bucket}/photos", f"{s3_bucket}/cache"
    _upload_photos(url, write_class_images(tmp_path / "photos", COLOURS, per_class=3))
    _machine(monkeypatch, tmp_path, "flow")
    manifest = _manifest(url, tmp_path / "flow-cache")
    (shard,) = plan_extraction(manifest, tiny, cache)
    publish_backbone(tiny, cache)

    worker = _machine(monkeypatch, tmp_path, "worker")
    elsewhere = dataclasses.replace(tiny, module_path=tmp_path / "the-flow-machine's-module")
    own = shared_backbone(elsewhere, cache)
    assert own.module_path.is_relative_to(worker) and own.fingerprint == tiny.fingerprint
    with ExtractionContext(cache, KERAS) as context:
        assert context.extract_shard(shard, elsewhere).extracted == 6
    assert len(FeatureCache(cache, tiny).store.listing()) == 1

    # A copy whose files no longer hash to the fingerprint is fetched again.
    (own.module_path / "saved_model.pb").write_bytes(b"damaged")
    assert (shared_backbone(elsewhere, cache).module_path / "saved_model.pb").read_bytes() != b"damaged"


@pytest.mark.e2e
def test_a_dask_worker_with_its_own_disk_extracts_a_shard_to_the_store(
    s3_bucket, moto_endpoint, tiny, tmp_path, monkeypatch
):
    distributed = pytest.importorskip("distributed")
    url, cache = f"{s3_bucket}/photos", f"{s3_bucket}/cache"
    _upload_photos(url, write_class_images(tmp_path / "photos", COLOURS, per_class=4))
    flow_machine = _machine(monkeypatch, tmp_path, "flow")
    manifest = _manifest(url, tmp_path / "flow-cache")
    (shard,) = plan_extraction(manifest, tiny, cache)
    publish_backbone(tiny, cache)
    # The worker cannot see this machine's module: it must run its own copy.
    backbone = dataclasses.replace(tiny, module_path=tmp_path / "not-on-the-worker")

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    worker_home = tmp_path / "worker"
    (worker_home / "cwd").mkdir(parents=True)
    root = Path(__file__).resolve().parent.parent
    base = {key: value for key, value in os.environ.items() if key not in ("XDG_CACHE_HOME", "PYTHONPATH")}
    env = {**base, **store_env(moto_endpoint), "PYTHONPATH": str(root)}
    dask = str(Path(sys.executable).parent / "dask")
    processes = []
    logs = [open(tmp_path / "scheduler.log", "w"), open(tmp_path / "worker.log", "w")]
    try:
        processes.append(
            subprocess.Popen(
                [dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                cwd=tmp_path,
                env={**env, "HOME": str(tmp_path / "scheduler")},
                stdout=subprocess.DEVNULL,
                stderr=logs[0],
                start_new_session=True,
            )
        )
        processes.append(
            subprocess.Popen(
                [dask, "worker", address, "--nworkers", "1", "--nthreads", "1", "--no-dashboard"],
                cwd=worker_home / "cwd",
                env={**env, "HOME": str(worker_home), "XDG_CACHE_HOME": str(worker_home / "cache")},
                stdout=subprocess.DEVNULL,
                stderr=logs[1],
                start_new_session=True,
            )
        )
        client = _connect(distributed, address, processes)
        try:
            client.wait_for_workers(1, timeout=120)
            context = ExtractionContext(cache, KERAS)
            result = client.submit(ExtractionContext.extract_shard, context, shard, backbone, pure=False).result()
        finally:
            client.close()
    finally:
        for process in reversed(processes):
            _stop(process)
        for log in logs:
            log.close()

    assert result.extracted == 8 and result.left_out == ()
    (name,) = FeatureCache(cache, tiny).store.listing()
    worker_copy = worker_home / "cache" / "headstart" / "store" / "s3" / cache.split("://", 1)[1]
    assert (worker_copy / "features" / f"{tiny.fingerprint}-32px" / name).is_file()
    assert (worker_copy / "backbones" / tiny.fingerprint / "module" / "saved_model.pb").is_file()
    # Nothing of the feature cache was written on the flow's machine.
    assert not local_copy(cache).exists() and local_copy(cache).is_relative_to(flow_machine)
    assert FeatureCache(cache, tiny).cached_hashes() == set(manifest.read().column("sha256").to_pylist())


def _connect(distributed, address: str, processes: list[subprocess.Popen]):
    """A client of the scheduler, once it answers; stops early where a process died."""
    deadline = time.monotonic() + 120
    while True:
        try:
            return distributed.Client(address, timeout="5s")
        except OSError:
            if time.monotonic() > deadline or any(process.poll() is not None for process in processes):
                raise
            time.sleep(0.5)


def test_the_train_flow_on_store_images_with_a_store_cache_reuses_another_machines_features(
    prefect_harness, s3_bucket, tiny_backbone_dir, tmp_path, monkeypatch, downloads
):
    from configs import smoke_config

    from flows.train import train
    from headstart.registry.runs import Run

    url, cache = f"{s3_bucket}/photos", f"{s3_bucket}/cache"
    _upload_photos(url, write_class_images(tmp_path / "photos", COLOURS, per_class=12))
    monkeypatch.chdir(tmp_path)
    extractions = []
    original = ExtractionContext.extract_shard

    def counting(self, shard, backbone, progress=None):
        extractions.append(len(shard))
        return original(self, shard, backbone, progress)

    monkeypatch.setattr(ExtractionContext, "extract_shard", counting)
    runs = {}
    for machine in ("a", "b"):
        _machine(monkeypatch, tmp_path, machine)
        config = smoke_config(url, tiny_backbone_dir, tmp_path / machine, gate=False, epochs=2, test_fraction=0.25)
        config = config.model_copy(update={"runtime": config.runtime.model_copy(update={"cache_dir": cache})})
        runs[machine] = Run(Path(train(**config.flat())))
        if machine == "a":
            assert sum(extractions) == 24
            shards = FeatureCache(cache, resolve_backbone(str(tiny_backbone_dir), 32, tmp_path / "bb")).store.listing()
            downloads.clear()
    assert sum(extractions) == 24  # machine B extracted nothing
    assert sorted(name for name in downloads if name.startswith("shard-")) == sorted(shards)
    assert runs["a"].lineage.training_key == runs["b"].lineage.training_key
    assert not (tmp_path / "a" / "cache").exists()  # the cache was the store's, in each machine's copy


def test_a_data_url_of_an_unknown_scheme_is_refused_by_the_config():
    with pytest.raises(ValueError, match="http:// is not a store headstart knows"):
        TrainConfig(data="http://example.com/photos")
    assert TrainConfig(data="s3://bucket/photos/").data.source == "s3://bucket/photos"
