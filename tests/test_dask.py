"""Feature extraction mapped over a real local Dask cluster gives exactly the single-process features."""

from pathlib import Path

import numpy as np
import pytest

from headstart.config import TrainConfig
from headstart.features import FeatureSet

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _features_of(run_dir: Path, config: TrainConfig) -> tuple[np.ndarray, list[str]]:
    dataset = next((config.cache_dir / "datasets").glob("*.parquet"))
    features, _, paths = FeatureSet(dataset, 0, 0, "").load()
    return features, paths


def test_dask_run_equals_local_run(prefect_harness, colour_folder, tiny_backbone_dir, tmp_path):
    from distributed import Client, LocalCluster

    from headstart import engines

    from flows.train import run_train

    common = dict(data=str(colour_folder), backbone=str(tiny_backbone_dir), extraction_shard_size=10, epochs=5, engine="litert")
    local = TrainConfig.smoke(artifacts_root=tmp_path / "local-runs", cache_dir=tmp_path / "local-cache", **common)
    local_run = Path(run_train(local))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        distributed = TrainConfig.smoke(artifacts_root=tmp_path / "dask-runs", cache_dir=tmp_path / "dask-cache",
                                        task_runner="dask", dask_address=cluster.scheduler_address, **common)
        dask_run = Path(run_train(distributed))
        with Client(cluster) as client:
            engines_per_worker = client.run(lambda: len(__import__("headstart.engines").engines._engines))
    local_features, local_paths = _features_of(local_run, local)
    dask_features, dask_paths = _features_of(dask_run, distributed)
    assert local_paths == dask_paths
    np.testing.assert_array_equal(local_features, dask_features)
    assert len(list((tmp_path / "dask-cache" / "features").rglob("shard-*.parquet"))) == 5  # 48 images in shards of 10
    assert (local_run / "metrics.json").read_text() == (dask_run / "metrics.json").read_text()
    # The forward passes ran on the workers, not in this process.
    assert sum(engines_per_worker.values()) >= 1
    assert not any("dask-cache" in key[2] for key in engines._engines)
