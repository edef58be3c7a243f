"""Feature extraction mapped over a real local Dask cluster gives exactly the single-process features.

The flow is called as a deployment calls it, with the config's fields as parameters: they alone send the
extraction tasks to the cluster.
"""

from pathlib import Path

import numpy as np
import pytest

from headstart.config import TrainConfig
from headstart.features.dataset import FeatureSet

pytestmark = pytest.mark.e2e


def _features_of(config: TrainConfig) -> tuple[np.ndarray, list[str]]:
    (dataset,) = (config.runtime.cache_dir / "datasets").glob("*.parquet")
    features, _, paths = FeatureSet(dataset, 0, 0, "").load()
    return features, paths


def test_dask_run_equals_local_run(prefect_harness, colour_folder, tiny_backbone_dir, tmp_path):
    from distributed import Client, LocalCluster, get_task_stream

    from flows.train import train

    common = dict(
        data=str(colour_folder), backbone=str(tiny_backbone_dir), extraction_shard_size=10, epochs=5, engine="litert"
    )
    local = TrainConfig.smoke(artifacts_root=tmp_path / "local-runs", cache_dir=tmp_path / "local-cache", **common)
    local_run = Path(train(**local.flat()))
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        distributed = TrainConfig.smoke(
            artifacts_root=tmp_path / "dask-runs",
            cache_dir=tmp_path / "dask-cache",
            task_runner="dask",
            dask_address=cluster.scheduler_address,
            **common,
        )
        with get_task_stream(client) as stream:
            dask_run = Path(train(**distributed.flat()))
        workers = set(cluster.workers[name].worker_address for name in cluster.workers)
    local_features, local_paths = _features_of(local)
    dask_features, dask_paths = _features_of(distributed)
    assert local_paths == dask_paths
    np.testing.assert_array_equal(local_features, dask_features)
    assert len(list((tmp_path / "dask-cache" / "features").rglob("shard-*.parquet"))) == 5  # 48 images in shards of 10
    assert (local_run / "metrics.json").read_text() == (dask_run / "metrics.json").read_text()
    # The five extraction tasks ran on the cluster's workers.
    assert len(stream.data) == 5 and {task["worker"] for task in stream.data} <= workers
