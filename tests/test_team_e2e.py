"""A team on several machines, simulated honestly (tests/team.py): SeaweedFS, a Prefect server,
process workers on machines a and b, a Dask cluster of two worker processes; each process with its
own working directory, HOME and cache, sharing nothing but the store and the Prefect server.

Each worker runs its deployments in its own environment and the Dask workers are separate homes.
"""

from __future__ import annotations

import json

import pytest

from tests.object_stores import seaweed_unavailable
from tests.team import team

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    if reason := seaweed_unavailable():
        pytest.skip(reason)
    with team(tmp_path_factory.mktemp("team")) as running:
        yield running


@pytest.mark.parametrize("machine", ["a", "b"])
def test_each_worker_runs_its_pools_flows_in_its_own_environment(setup, machine):
    flow_run = setup.run(f"where-am-i/where-am-i-{machine}")
    assert flow_run["state"]["type"] == "COMPLETED"
    seen = json.loads(flow_run["state"]["message"])
    own = setup.machines[machine]
    assert (seen["HOME"], seen["XDG_CACHE_HOME"]) == (str(own.home), str(own.cache))
    assert seen["TMPDIR"].startswith(str(own.disk)) and seen["AWS_ENDPOINT_URL"] == setup.endpoint


def test_the_dask_workers_are_two_processes_with_their_own_homes(setup):
    import os

    from distributed import Client

    with Client(setup.scheduler) as client:
        homes = client.run(lambda: (os.environ["HOME"], os.getpid()))
    assert sorted(home for home, _ in homes.values()) == [str(setup.machines[n].home) for n in ("dask-1", "dask-2")]
    assert len({pid for _, pid in homes.values()}) == 2
