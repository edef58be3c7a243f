"""A team on several machines, simulated honestly (tests/team.py): SeaweedFS, a Prefect server,
process workers on machines a and b, a Dask cluster of two worker processes; each process with its
own working directory, HOME and cache, sharing nothing but the store and the Prefect server.

The scenario, in order: the photos are uploaded to the store; `train` runs on worker a with its
extraction on the Dask workers, everything on the store; `predict --model champion` runs on worker
b; a retrain with another setting on worker b reuses a's features from the store; two processes on
two more machines promote at once, and exactly one champion and every history entry remain. While
b works, a's disk is out of reach, so b can only have used what is on the store.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
from conftest import write_class_images

from tests.object_stores import seaweed_unavailable
from tests.servers import PROJECT
from tests.team import team

pytestmark = pytest.mark.e2e
COLOURS = {"red": (200, 40, 40), "blue": (40, 40, 200)}
PER_CLASS = 40
# Small and quick: eight extraction shards over the two Dask workers; enough images and epochs for
# a first model that beats always answering the majority class, so that the gate promotes it.
SETTINGS = {"image_size": 64, "extraction_shard_size": 10, "epochs": 8}
SHARDS = 2 * PER_CLASS // SETTINGS["extraction_shard_size"]
PROMOTIONS = 8


def _project_files() -> set[str]:
    """What git sees in the project folder besides its tracked files (bytecode aside)."""
    listed = subprocess.run(
        ["git", "status", "--porcelain", "--ignored", "--untracked-files=all"],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {line for line in listed.splitlines() if "__pycache__" not in line and ".pytest_cache" not in line}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    if reason := seaweed_unavailable():
        pytest.skip(reason)
    before = _project_files()
    with team(tmp_path_factory.mktemp("team")) as running:
        yield running
    assert _project_files() == before, "a machine wrote into the project folder (its code checkout)"


@pytest.fixture(scope="module")
def places(setup, tmp_path_factory) -> dict[str, str]:
    """The photos uploaded to the store (as someone on another machine would), and the store places."""
    photos = write_class_images(tmp_path_factory.mktemp("uploader") / "photos", COLOURS, per_class=PER_CLASS)
    setup.store().put(f"{photos}/", f"{setup.bucket[len('s3://') :]}/photos/", recursive=True)
    bucket = setup.bucket
    return {"data": f"{bucket}/photos", "artifacts_root": f"{bucket}/runs", "cache_dir": f"{bucket}/cache"}


def _read_json(setup, url: str) -> dict:
    return json.loads(setup.store().cat_file(url))


def _champion(setup, places) -> dict:
    return _read_json(setup, f"{places['artifacts_root']}/registry/champion.json")


def _executed(setup) -> dict[str, int]:
    """Tasks each Dask worker has run, by its home."""
    from distributed import Client

    with Client(setup.scheduler) as client:
        counts = client.run(lambda dask_worker: (os.environ["HOME"], dask_worker.state.executed_count))
    return dict(counts.values())


@pytest.fixture(scope="module")
def first(setup, places) -> dict:
    """`train` on worker a, its extraction on the Dask cluster: the flow run, with the version."""
    flow_run = setup.run("train/train-a", **places, **SETTINGS, task_runner="dask", dask_address=setup.scheduler)
    assert flow_run["state"]["type"] == "COMPLETED", setup.worker_logs()
    assert flow_run["state"]["message"].startswith("promoted"), (flow_run["state"]["message"], setup.worker_logs())
    return {**flow_run, "version": _champion(setup, places)["version"]}


@pytest.fixture(scope="module")
def predicted(setup, places, first):
    """`predict --model champion` on worker b, on images dropped on b's own disk, a's disk away."""
    inbox = setup.machines["b"].work / "inbox"
    write_class_images(inbox, {"red": COLOURS["red"]}, per_class=6, seed=1)
    output = setup.machines["b"].work / "predictions.csv"
    with setup.away("a"):
        flow_run = setup.run(
            "predict/predict-b",
            inputs=[str(inbox)],
            model="champion",
            artifacts_root=places["artifacts_root"],
            cache_dir=places["cache_dir"],
            output=str(output),
        )
    return flow_run, output


@pytest.fixture(scope="module")
def retrained(setup, places, first, predicted) -> dict:
    """A retrain on worker b with another number of epochs (a new training key, so it trains), a's
    disk away: the flow run, with its version and metrics."""
    before = _champion(setup, places)
    with setup.away("a"):
        flow_run = setup.run("train/train-b", **places, **{**SETTINGS, "epochs": SETTINGS["epochs"] + 1})
    assert flow_run["state"]["type"] == "COMPLETED", setup.worker_logs()
    versions = setup.store().ls(places["artifacts_root"].removeprefix("s3://"))
    names = sorted(path.rsplit("/", 1)[1] for path in versions)
    (version,) = [name for name in names if name not in (first["version"], "registry") and name[0].isdigit()]
    metrics = _read_json(setup, f"{places['artifacts_root']}/{version}/metrics.json")
    return {**flow_run, "version": version, "metrics": metrics, "champion_before": before}


@pytest.mark.parametrize("machine", ["a", "b"])
def test_each_worker_runs_its_pools_flows_in_its_own_environment(setup, machine):
    flow_run = setup.run(f"where-am-i/where-am-i-{machine}")
    assert flow_run["state"]["type"] == "COMPLETED"
    seen = json.loads(flow_run["state"]["message"])
    own = setup.machines[machine]
    assert (seen["HOME"], seen["XDG_CACHE_HOME"]) == (str(own.home), str(own.cache))
    assert seen["TMPDIR"].startswith(str(own.disk)) and seen["AWS_ENDPOINT_URL"] == setup.endpoint


def test_the_dask_workers_are_two_processes_with_their_own_homes(setup):
    from distributed import Client

    with Client(setup.scheduler) as client:
        homes = client.run(lambda: (os.environ["HOME"], os.getpid()))
    assert sorted(home for home, _ in homes.values()) == [str(setup.machines[n].home) for n in ("dask-1", "dask-2")]
    assert len({pid for _, pid in homes.values()}) == 2


def test_train_on_a_extracts_on_the_dask_workers_and_publishes_to_the_store(setup, places, first):
    root = places["artifacts_root"]
    metrics = _read_json(setup, f"{root}/{first['version']}/metrics.json")
    assert (metrics["features_extracted"], metrics["features_reused"]) == (2 * PER_CLASS, 0)
    # Every shard extracted by one of the Dask workers, and both took some.
    executed = _executed(setup)
    assert sum(executed.values()) == SHARDS and all(executed.values()), executed
    shards = setup.store().glob(f"{places['cache_dir'].removeprefix('s3://')}/features/*/shard-*.parquet")
    assert len(shards) == SHARDS
    # Each Dask worker has its own copy of the backbone, on its own disk.
    for name in ("dask-1", "dask-2"):
        assert list(setup.machines[name].disk.rglob("saved_model.pb")), f"no backbone on {name}'s disk"
    assert setup.store().exists(f"{root}/{first['version']}/PUBLISHED.json")


def test_predict_with_the_champion_on_b(setup, predicted):
    flow_run, output = predicted
    assert flow_run["state"]["type"] == "COMPLETED", setup.worker_logs()
    rows = list(csv.DictReader(output.open()))
    assert len(rows) == 6 and {row["label"] for row in rows} == {"red"}


def test_a_retrain_on_b_reuses_the_features_a_extracted(setup, places, first, retrained):
    assert (retrained["metrics"]["features_extracted"], retrained["metrics"]["features_reused"]) == (
        0,
        2 * PER_CLASS,
    )
    assert setup.store().exists(f"{places['artifacts_root']}/{retrained['version']}/PUBLISHED.json")
    # b read the shards through its own copies; a's disk has nothing of b's.
    assert len(list(setup.machines["b"].cache.rglob("shard-*.parquet"))) == SHARDS
    assert not [path for path in setup.machines["a"].files() if retrained["version"] in str(path)]


def test_two_processes_promoting_at_once_leave_one_champion_and_every_entry(setup, places, first, retrained):
    root = places["artifacts_root"]
    before = _champion(setup, places)["history"]
    script = (
        "import sys; from headstart.registry import versions as registry\n"
        "for i in range(int(sys.argv[3])): registry.promote(sys.argv[1], sys.argv[2], f'{sys.argv[2]} {i}')"
    )
    promoters = [
        subprocess.Popen(
            [sys.executable, "-c", script, root, version, str(PROMOTIONS)],
            cwd=setup.machines[machine].work,
            env=setup.env(machine, PYTHONPATH=str(PROJECT)),
            stderr=subprocess.PIPE,
            text=True,
        )
        for machine, version in (("promoter-1", first["version"]), ("promoter-2", retrained["version"]))
    ]
    for promoter in promoters:
        assert promoter.wait(timeout=300) == 0, promoter.stderr.read()[-3000:]
    champion = _champion(setup, places)
    history = champion["history"]
    assert history[: len(before)] == before
    reasons = sorted(entry["reason"] for entry in history[len(before) :])
    expected = sorted(f"{v} {i}" for v in (first["version"], retrained["version"]) for i in range(PROMOTIONS))
    assert reasons == expected
    assert champion["version"] == history[-1]["version"]
    listed = setup.headstart("b", "models", "--json", "--artifacts-root", root)
    assert listed.returncode == 0, listed.stderr[-3000:]
    assert [v["version"] for v in json.loads(listed.stdout) if v["champion"]] == [champion["version"]]
