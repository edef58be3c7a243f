"""A team's set-up on one machine, simulated honestly: an S3-compatible store (SeaweedFS), a
Prefect server, two process workers ("machine" a and b, each on its own work pool) and a Dask
cluster (a scheduler and two worker processes). Every process gets its own working directory,
HOME, XDG_CACHE_HOME and TMPDIR, and the store's standard AWS variables: they share nothing but the
store and the Prefect server. The code is each machine's checkout of the project (the deployments'
pull step goes to the project folder, as prefect.yaml's does); nothing is written there.

`team(directory)` starts it all and always tears it down; it yields a `Team`, which runs
deployments (`prefect deployment run`), `headstart` and `prefect` commands as one of its machines.
`where_am_i` is a trivial flow, deployed on both pools, that reports the environment it ran in.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from prefect import flow
from prefect.states import Completed

from tests.object_stores import ACCESS_KEY, SECRET_KEY, make_bucket, seaweed_server, store_env
from tests.servers import PROJECT, _stop, api, free_port, prefect_server

BUCKET = "team"
POOLS = {"a": "team-a", "b": "team-b"}
# Deployments of the project's flows on each machine's pool: `<flow>/<name>-<machine>`.
FLOWS = {
    "train": "flows/train.py:train",
    "predict": "flows/predict.py:predict",
    "where-am-i": "tests/team.py:where_am_i",
}
QUIET = {"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONWARNINGS": "ignore:pkg_resources is deprecated"}
# What a process of this test run must not carry over to a machine: its home, caches, Prefect and
# store settings, working directory.
PRIVATE = ("HOME", "PWD", "OLDPWD", "TMPDIR", "PYTHONPATH", "KERAS_HOME", "TFHUB_CACHE_DIR")
PRIVATE_PREFIXES = ("PREFECT_", "AWS_", "XDG_", "DASK_")


@flow(name="where-am-i")
def where_am_i():
    """The environment this flow run sees, as its state message (JSON)."""
    seen = {name: os.environ.get(name) for name in ("HOME", "XDG_CACHE_HOME", "TMPDIR", "AWS_ENDPOINT_URL")}
    return Completed(message=json.dumps({**seen, "cwd": os.getcwd(), "pid": os.getpid()}))


@dataclass(frozen=True)
class Machine:
    """One simulated machine: a folder that is its whole disk."""

    name: str
    disk: Path

    @property
    def home(self) -> Path:
        return self.disk / "home"

    @property
    def work(self) -> Path:
        return self.disk / "work"

    @property
    def cache(self) -> Path:
        return self.disk / "cache"

    def create(self) -> Machine:
        for folder in (self.home, self.work, self.cache, self.disk / "tmp"):
            folder.mkdir(parents=True, exist_ok=True)
        return self

    def env(self, api_url: str, endpoint: str, **extra: str) -> dict[str, str]:
        inherited = {
            name: value
            for name, value in os.environ.items()
            if name not in PRIVATE and not name.startswith(PRIVATE_PREFIXES)
        }
        return {
            **inherited,
            **QUIET,
            **store_env(endpoint),
            "HOME": str(self.home),
            "XDG_CACHE_HOME": str(self.cache),
            "TMPDIR": str(self.disk / "tmp"),
            "PREFECT_HOME": str(self.home / ".prefect"),
            "PREFECT_API_URL": f"{api_url}/api",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "COLUMNS": "250",
            **extra,
        }

    def files(self) -> set[Path]:
        """Every file on this machine's disk."""
        return {path for path in self.disk.rglob("*") if path.is_file()}


class Team:
    """The running set-up: its machines, the Prefect server's URL, the store's endpoint and bucket,
    the Dask scheduler's address."""

    def __init__(self, root: Path, url: str, endpoint: str, bucket: str, scheduler: str, machines: dict, logs: Path):
        self.root, self.url, self.endpoint, self.bucket, self.scheduler = root, url, endpoint, bucket, scheduler
        self.machines: dict[str, Machine] = machines
        self.logs = logs

    def env(self, machine: str, **extra: str) -> dict[str, str]:
        return self.machines[machine].env(self.url, self.endpoint, **extra)

    def run_command(self, machine: str, *command: str, cwd: Path | None = None, timeout: float = 300):
        """A command on a machine, from its working directory (default); the finished process."""
        return subprocess.run(
            command,
            cwd=cwd or self.machines[machine].work,
            env=self.env(machine),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def prefect(self, *args: str, machine: str = "admin", cwd: Path | None = None, timeout: float = 300) -> str:
        done = self.run_command(machine, sys.executable, "-m", "prefect", *args, cwd=cwd, timeout=timeout)
        assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done.stdout

    def headstart(self, machine: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """`headstart ARGS` on a machine, from its working directory, with the project's code."""
        return subprocess.run(
            [sys.executable, "-m", "flows.cli", *args],
            cwd=self.machines[machine].work,
            env=self.env(machine, PYTHONPATH=str(PROJECT)),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def run(self, deployment: str, **parameters) -> dict:
        """Runs a deployment (`prefect deployment run NAME --param …`), waits for it; the flow run."""
        options = [item for name, value in parameters.items() for item in ("--param", f"{name}={json.dumps(value)}")]
        try:
            output = self.prefect(
                "deployment",
                "run",
                deployment,
                *options,
                "--watch",
                "--watch-interval",
                "2",
                "--watch-timeout",
                "900",
                timeout=960,
            )
        except AssertionError as failure:
            raise AssertionError(f"{failure}\n{self.worker_logs()}") from None
        flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", output).group(1)
        return api(self.url, f"/flow_runs/{flow_run_id}")

    def store(self):
        """The store as the test sees it (an s3fs file system), to look at what the machines left there."""
        import s3fs

        return s3fs.S3FileSystem(
            key=ACCESS_KEY, secret=SECRET_KEY, client_kwargs={"endpoint_url": self.endpoint}, skip_instance_cache=True
        )

    @contextlib.contextmanager
    def away(self, machine: str) -> Iterator[None]:
        """A machine's disk out of reach (renamed) meanwhile: on one host, that is what makes sure no
        other machine reads a file through the machine's own paths. Its processes keep running."""
        disk = self.machines[machine].disk
        hidden = disk.with_name(f"{disk.name}.away")
        disk.rename(hidden)
        try:
            yield
        finally:
            hidden.rename(disk)

    def worker_logs(self, tail: int = 3000) -> str:
        return "\n".join(
            f"--- {log.name}:\n{log.read_text(errors='replace')[-tail:]}" for log in sorted(self.logs.glob("*.log"))
        )


@contextlib.contextmanager
def _process(command: list[str], machine: Machine, env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """A long-running process of a machine, in its working directory; stopped with its children."""
    with open(log, "w") as output:
        process = subprocess.Popen(
            command, cwd=machine.work, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield process
    finally:
        _stop(process)


def _wait_for_dask_workers(address: str, count: int, processes: list[subprocess.Popen], logs: Path) -> None:
    from distributed import Client

    deadline = time.monotonic() + 180
    with Client(address, timeout=60) as client:
        while len(client.scheduler_info()["workers"]) < count:
            if time.monotonic() > deadline or any(process.poll() is not None for process in processes):
                raise RuntimeError(f"the Dask workers did not join:\n{_tails(logs, 'dask')}")
            time.sleep(0.5)


def _tails(logs: Path, prefix: str) -> str:
    return "\n".join(f"--- {log.name}:\n{log.read_text()[-2000:]}" for log in sorted(logs.glob(f"{prefix}*.log")))


@contextlib.contextmanager
def dask_cluster(scheduler: Machine, workers: list[Machine], url: str, endpoint: str, logs: Path) -> Iterator[str]:
    """`dask scheduler` on one machine and a `dask worker` process (one thread) on each of the
    others; yields the scheduler's address once every worker has joined."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    with contextlib.ExitStack() as stack:
        stack.enter_context(
            _process(
                [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(port)]
                + ["--no-dashboard"],
                scheduler,
                scheduler.env(url, endpoint),
                logs / f"{scheduler.name}.log",
            )
        )
        started = []
        for machine in workers:
            command = [sys.executable, "-m", "distributed.cli.dask_worker", address, "--name", machine.name]
            command += ["--nworkers", "1", "--nthreads", "1", "--no-dashboard", "--local-directory", str(machine.work)]
            # The project's code is this machine's checkout: the extraction tasks import it.
            env = machine.env(url, endpoint, PYTHONPATH=str(PROJECT))
            started.append(stack.enter_context(_process(command, machine, env, logs / f"{machine.name}.log")))
        _wait_for_dask_workers(address, len(workers), started, logs)
        yield address


def _prefect_yaml(path: Path) -> Path:
    """The deployments: every flow of FLOWS on each machine's pool. Code comes from the project
    folder only (no push, no build; the pull step goes there, as prefect.yaml's does)."""
    deployments = [
        {
            "name": f"{name}-{machine}",
            "entrypoint": entrypoint,
            "work_pool": {"name": pool, "job_variables": {"env": QUIET}},
        }
        for machine, pool in POOLS.items()
        for name, entrypoint in FLOWS.items()
    ]
    document = {
        "name": "headstart-team",
        "prefect-version": "3.9.1",
        "build": None,
        "push": None,
        "pull": [{"prefect.deployments.steps.set_working_directory": {"directory": str(PROJECT)}}],
        "deployments": deployments,
    }
    path.write_text(json.dumps(document, indent=2))  # JSON is YAML
    return path


@contextlib.contextmanager
def team(root: Path) -> Iterator[Team]:
    """Starts the store, the server, the workers and the Dask cluster under `root`; always stops them."""
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    names = ("admin", "a", "b", "dask-scheduler", "dask-1", "dask-2", "promoter-1", "promoter-2")
    machines = {name: Machine(name, root / "machines" / name).create() for name in names}
    with contextlib.ExitStack() as stack:
        endpoint = stack.enter_context(seaweed_server(root / "seaweed"))
        bucket = make_bucket(endpoint, BUCKET)
        prefect_home = root / "prefect-server"
        prefect_home.mkdir()
        url = stack.enter_context(prefect_server(prefect_home))

        workers = [machines["dask-1"], machines["dask-2"]]
        scheduler = stack.enter_context(dask_cluster(machines["dask-scheduler"], workers, url, endpoint, logs))

        setup = Team(root, url, endpoint, bucket, scheduler, machines, logs)
        for pool in POOLS.values():
            setup.prefect("work-pool", "create", pool, "--type", "process")
        setup.prefect("deploy", "--all", "--prefect-file", str(_prefect_yaml(root / "prefect.yaml")), cwd=PROJECT)
        for name, pool in POOLS.items():
            machine = machines[name]
            env = machine.env(url, endpoint, PREFECT_WORKER_QUERY_SECONDS="2", PREFECT_WORKER_PREFETCH_SECONDS="2")
            command = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--name", f"machine-{name}"]
            stack.enter_context(_process(command, machine, env, logs / f"worker-{name}.log"))
        yield setup
