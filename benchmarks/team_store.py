"""A team's runs on an object store against a single machine's local paths.

    uv run python benchmarks/team_store.py [--images 1000] [--repeats 5] [--image-size 96]

Starts SeaweedFS and a Prefect server in a temporary folder (tests/object_stores.py,
tests/servers.py); every `headstart train` runs as its own machine (tests/team.py: its own working
directory, HOME and cache; the store reached through the standard AWS variables). The images are
the first --images of ../shared/datasets/cifar10-catdog, half cats, half dogs, in a local folder
and uploaded to s3://bench/photos.

1. A repeat run with everything cached: local paths (folder, artifacts root and cache on the
   machine's disk) against store URLs (data, artifacts root and cache on the store), each run
   first once, then --repeats times alternately, side by side; and the same store run on a new
   machine (an empty disk, everything on the store).
2. The first run's extraction on a Dask cluster with one and with two worker processes (one
   thread each, their own disks), each on a new cache: the extraction tasks' span from the
   Prefect API.
3. Bytes the store holds after each run, by top-level prefix (first run, repeat).

Prints a markdown table and writes it to benchmarks/results/team-store.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(PROJECT)]

from tests.object_stores import ACCESS_KEY, SECRET_KEY, make_bucket, seaweed_server  # noqa: E402
from tests.servers import api, prefect_server  # noqa: E402
from tests.team import Machine, dask_cluster  # noqa: E402

RESULTS = PROJECT / "benchmarks" / "results" / "team-store.md"
DATASET = PROJECT.parent / "shared" / "datasets" / "cifar10-catdog"
BUCKET = "bench"


class Bench:
    def __init__(self, work: Path, url: str, endpoint: str, image_size: int):
        self.work, self.url, self.endpoint, self.image_size = work, url, endpoint, image_size
        self.count = 0
        import s3fs

        self.fs = s3fs.S3FileSystem(
            key=ACCESS_KEY, secret=SECRET_KEY, client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True
        )

    def machine(self, name: str) -> Machine:
        self.count += 1
        return Machine(name, self.work / "machines" / f"{self.count:02d}-{name}").create()

    def train(self, machine: Machine, data: str, root: str, cache: str, *options: str) -> tuple[float, str]:
        """`headstart train` on a machine; its wall time and run directory."""
        command = [sys.executable, "-m", "flows.cli", "train", "--data", data, "--artifacts-root", root]
        command += ["--cache-dir", cache, "--image-size", str(self.image_size), "--epochs", "5", *options]
        started = time.perf_counter()
        done = subprocess.run(
            command,
            cwd=machine.work,
            env=machine.env(self.url, self.endpoint, PYTHONPATH=str(PROJECT)),
            capture_output=True,
            text=True,
            timeout=3600,
        )
        elapsed = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"train on {machine.name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
        return elapsed, done.stdout.strip().splitlines()[-1]

    def stored(self) -> dict[str, tuple[int, int]]:
        """Bytes and objects the store holds, by top-level prefix of the bucket."""
        sizes: dict[str, tuple[int, int]] = {}
        for key, info in self.fs.find(BUCKET, detail=True).items():
            prefix = key.split("/")[1]
            size, count = sizes.get(prefix, (0, 0))
            sizes[prefix] = (size + info["size"], count + 1)
        return sizes

    def extraction_span(self) -> tuple[float, int]:
        """The latest train flow run's extraction: first extract_features start to last end (s), tasks."""
        (flow_run,) = api(self.url, "/flow_runs/filter", {"sort": "START_TIME_DESC", "limit": 1})
        tasks = api(self.url, "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run["id"]]}}})
        spans = [t for t in tasks if t["name"].startswith("extract_features") and t["start_time"] and t["end_time"]]
        start = min(datetime.fromisoformat(t["start_time"]) for t in spans)
        end = max(datetime.fromisoformat(t["end_time"]) for t in spans)
        return (end - start).total_seconds(), len(spans)


def _images(destination: Path, count: int) -> Path:
    for name in ("cat", "dog"):
        (destination / name).mkdir(parents=True)
        for image in sorted((DATASET / name).iterdir())[: count // 2]:
            shutil.copy(image, destination / name / image.name)
    return destination


def _delta(after: dict, before: dict) -> str:
    parts = []
    for prefix in sorted(after):
        size = after[prefix][0] - before.get(prefix, (0, 0))[0]
        objects = after[prefix][1] - before.get(prefix, (0, 0))[1]
        if objects or size:
            parts.append(f"{prefix}/: {size / 1e6:.2f} MB in {objects} objects")
    return "; ".join(parts) or "nothing"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--shard-size", type=int, default=100)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    load = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="headstart-team-store-"))
    lines: list[str] = []
    try:
        with contextlib.ExitStack() as stack:
            endpoint = stack.enter_context(seaweed_server(work / "seaweed"))
            store = make_bucket(endpoint, BUCKET)
            (work / "prefect").mkdir()
            url = stack.enter_context(prefect_server(work / "prefect"))
            bench = Bench(work, url, endpoint, args.image_size)
            photos = _images(work / "photos", args.images)
            bench.fs.put(str(photos) + "/", f"{BUCKET}/photos/", recursive=True)
            shards = ("--extraction-shard-size", str(args.shard_size))

            # 1 and 3: first runs, then repeats side by side.
            local = bench.machine("local")
            local_places = (str(photos), str(local.work / "artifacts"), str(local.work / "cache"))
            store_machine = bench.machine("store")
            store_places = (f"{store}/photos", f"{store}/runs", f"{store}/cache")
            before = bench.stored()
            first_local, _ = bench.train(local, *local_places, *shards)
            first_store, _ = bench.train(store_machine, *store_places, *shards)
            after_first = bench.stored()
            times = {"local": [], "store": [], "new machine": []}
            uploads = []
            for _ in range(args.repeats):
                times["local"].append(bench.train(local, *local_places, *shards)[0])
                previous = bench.stored()
                times["store"].append(bench.train(store_machine, *store_places, *shards)[0])
                uploads.append(_delta(bench.stored(), previous))
            for _ in range(min(args.repeats, 3)):
                times["new machine"].append(bench.train(bench.machine("new"), *store_places, *shards)[0])

            # 2: the first run's extraction with one and two Dask worker processes.
            extraction = {}
            for count in (1, 2):
                scheduler = bench.machine("dask-scheduler")
                workers = [bench.machine(f"dask-worker-{i + 1}") for i in range(count)]
                logs = work / f"dask-{count}-logs"
                logs.mkdir()
                with dask_cluster(scheduler, workers, url, endpoint, logs) as address:
                    runner = ("--task-runner", "dask", "--dask-address", address, "--threads", "1", "--no-gate")
                    places = (f"{store}/photos", f"{store}/runs-dask-{count}", f"{store}/cache-dask-{count}")
                    wall, _ = bench.train(bench.machine("flow"), *places, *shards, *runner)
                    extraction[count] = (*bench.extraction_span(), wall)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def median(values: list[float]) -> str:
        return f"{statistics.median(values):.1f} s"

    def each(values: list[float]) -> str:
        return ", ".join(f"{value:.1f}" for value in values)

    ratio = statistics.median(times["store"]) / statistics.median(times["local"])
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines += [
        "# A team's runs on an object store, against local paths",
        "",
        f"Measured {when} by `benchmarks/team_store.py --images {args.images} --repeats {args.repeats} "
        f"--image-size {args.image_size}` on {os.cpu_count()} cores ({platform.machine()}), load average "
        f"{load:.1f} at the start, every server and process on this one machine (SeaweedFS, a Prefect server, "
        "each run a separate machine with its own HOME and cache). The machine is shared and small: read the "
        "ratios, not the seconds.",
        "",
        f"## A repeat run with everything cached ({args.images} images, every input identical: the run is reused)",
        "",
        "| places | first run | repeats (s) | median repeat |",
        "|---|---|---|---|",
        f"| local paths | {first_local:.1f} s | {each(times['local'])} | {median(times['local'])} |",
        f"| store URLs, the same machine | {first_store:.1f} s | {each(times['store'])} | {median(times['store'])} |",
        f"| store URLs, a new machine each time (empty disk) | | {each(times['new machine'])} | "
        f"{median(times['new machine'])} |",
        "",
        f"Store against local, median repeat: {ratio:.2f}×.",
        "",
        "## The first run's extraction on a Dask cluster (one thread per worker process)",
        "",
        "| Dask worker processes | extraction tasks | extraction span | whole run |",
        "|---|---|---|---|",
        *(f"| {n} | {tasks} | {span:.1f} s | {wall:.1f} s |" for n, (span, tasks, wall) in extraction.items()),
        "",
        f"Two workers against one: {extraction[1][0] / extraction[2][0]:.2f}× faster extraction.",
        "",
        "## Bytes the store holds more after a run",
        "",
        f"- first run: {_delta(after_first, before)}",
        f"- a repeat (the first of {len(uploads)}): {uploads[0]}",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    args.output.write_text(text)


if __name__ == "__main__":
    main()
