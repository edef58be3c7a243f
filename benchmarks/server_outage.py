"""How long a Prefect server outage a `train` deployment run survives, at each stage.

    uv run python benchmarks/server_outage.py [--stages extraction,training,publish,gate] [--outages 120,300]

A real `prefect server start` (SQLite), the project's deployments and a process worker, as the
README sets them up. For each stage and outage length: a `train/train` run (the gate on) on
generated images, with the server killed (SIGKILL to its process group) as soon as the stage's
task is running, started again after the outage on the same port and PREFECT_HOME, then the run
followed to its end. Each measurement has its own cache and artifacts root, so that every run
extracts its features anew. Prints a markdown table and writes it to
benchmarks/results/server-outage.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(PROJECT), str(PROJECT / "tests")]

from conftest import write_class_images  # noqa: E402
from servers import api, free_port, prefect_env, prefect_server, process_worker  # noqa: E402

RESULTS = PROJECT / "benchmarks" / "results" / "server-outage.md"
# The line of the run's log after which each stage begins: the task before it finished.
STAGES = {
    "extraction": "Task run 'plan_extraction-",
    "training": "Task run 'build_model-",
    "publish": "Task run 'visualize-",
    "gate": "Task run 'near_duplicates-",
}
COLOURS = {"day": (230, 200, 40), "night": (20, 30, 90)}
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def prefect(home: Path, url: str, *args: str, timeout: float = 300) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "prefect", *args],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=prefect_env(home, f"{url}/api", PWD=str(PROJECT), COLUMNS="250"),
    )
    if result.returncode != 0:
        raise RuntimeError(f"prefect {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout


def deploy(home: Path, url: str) -> None:
    """The README's commands, in its order."""
    prefect(home, url, "work-pool", "create", "headstart", "--type", "process")
    prefect(home, url, "work-queue", "create", "training", "--pool", "headstart", "--limit", "1")
    prefect(home, url, "deploy", "--all")


def start_run(home: Path, url: str, job_env: dict | None = None, **parameters) -> str:
    options = [item for name, value in parameters.items() for item in ("--param", f"{name}={json.dumps(value)}")]
    if job_env:
        options += ["--job-variable", f"env={json.dumps(job_env)}"]
    output = prefect(home, url, "deployment", "run", "train/train", *options)
    return re.search(r"UUID: ([0-9a-f-]{36})", output).group(1)


def wait_for_line(log: Path, offset: int, marker: str, timeout: float = 900) -> str:
    """Waits until `marker` is in the worker's log after `offset`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(log, "rb") as file:
            file.seek(offset)
            if marker.encode() in file.read():
                return "as it began"
        time.sleep(0.02)
    raise TimeoutError(f"{marker!r} never came")


def wait_for_exit(worker, timeout: float = 300) -> float | None:
    """Seconds until the worker has no flow run process left (None: still there after `timeout`)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if not subprocess.run(["pgrep", "-P", str(worker.pid)], capture_output=True).stdout.strip():
            return time.monotonic() - started
        time.sleep(1)
    return None


def wait_for_end(url: str, flow_run_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            run = api(url, f"/flow_runs/{flow_run_id}", timeout=10)
        except (urllib.error.URLError, OSError):
            run = None
        if run and run["state_type"] in TERMINAL:
            return run
        if time.monotonic() > deadline:
            return run or {"state_type": "UNKNOWN", "state": {"message": "server unreachable"}}
        time.sleep(1)


def measure(
    home: Path,
    port: int,
    url: str,
    data: Path,
    work: Path,
    stage: str,
    outage: float,
    started: list,
    job_env: dict | None = None,
    rerun: bool = False,
    worker=None,
    worker_log: Path | None = None,
) -> dict:
    """One outage; returns what happened. The server in `started[-1]` is killed; the one started
    again stays up (it is appended to `started`). With `rerun`, the same run is started again
    once the first has ended (or is seen to be lost), as a nightly schedule would."""
    places = {"artifacts_root": str(work / "artifacts"), "cache_dir": str(work / "cache")}
    parameters = {"data": str(data), "image_size": 224, "extraction_shard_size": 25, "gate": True, **places}
    offset = worker_log.stat().st_size
    flow_run_id = start_run(home, url, job_env, **parameters)
    seen = wait_for_line(worker_log, offset, STAGES[stage])
    os.killpg(started[-1].pid, signal.SIGKILL)
    started[-1].wait()
    killed_at = time.monotonic()
    time.sleep(outage)
    restart = prefect_server(home, started=started, port=port)
    restart.__enter__()
    back_after = time.monotonic() - killed_at
    run = wait_for_end(url, flow_run_id, timeout=240 if rerun else 900)
    ended_after = round(time.monotonic() - killed_at - back_after)
    exited = wait_for_exit(worker)
    exited_after = None if exited is None else round(time.monotonic() - killed_at - back_after)
    runs = [path for path in (work / "artifacts").glob("2*") if path.is_dir()]
    unfinished = _unfinished_tasks(url, flow_run_id)
    again = None
    if rerun:
        second = wait_for_end(url, start_run(home, url, **parameters), timeout=900)
        again = second["state_type"]
    return {
        "stage": stage,
        "outage_s": round(back_after),
        "killed_when": seen,
        "state": run["state_type"],
        "message": (run["state"] or {}).get("message") or "",
        "run_dirs": len(runs),
        "tasks_left_unfinished": unfinished,
        "ended_after_restart_s": ended_after,
        "process_gone_after_restart_s": exited_after,
        "rerun": again,
        "flow_run_id": flow_run_id,
        "_restart": restart,
    }


def _unfinished_tasks(url: str, flow_run_id: str, wait: float = 60) -> int:
    """Task runs the server still shows unfinished once the flow run has ended (their last
    state events lost), after giving it `wait` seconds to take the events sent late."""
    deadline = time.monotonic() + wait
    while True:
        runs = api(url, "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}}, timeout=10)
        unfinished = sum(run["state_type"] not in TERMINAL for run in runs)
        if unfinished == 0 or time.monotonic() > deadline:
            return unfinished
        time.sleep(2)


def _again(row: dict) -> str:
    if row.get("rerun") is None:
        return ""
    return f"{row['rerun']}" + (", reusing the lost run's work" if row.get("reused") else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--outages", default="120,300", help="outage lengths in seconds, comma-separated")
    parser.add_argument("--images-per-class", type=int, default=300)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument(
        "--past-the-retries",
        action="store_true",
        help="also: an outage at publish longer than the run's retries (cut to 2 for it), then the same run again",
    )
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="headstart-outage-"))
    home = root / "prefect-home"
    home.mkdir()
    data = write_class_images(root / "data", COLOURS, per_class=args.images_per_class, size=96)
    port = free_port()
    started: list = []
    restarts = []
    rows = []
    try:
        with prefect_server(home, started=started, port=port) as url:
            deploy(home, url)
            log = root / "worker.log"
            with process_worker(home, f"{url}/api", "headstart", log) as worker:
                for outage in [float(value) for value in args.outages.split(",")]:
                    for stage in args.stages.split(","):
                        work = root / f"{stage}-{int(outage)}"
                        row = measure(
                            home, port, url, data, work, stage, outage, started, worker=worker, worker_log=log
                        )
                        restarts.append(row.pop("_restart"))
                        row["worker_alive"] = worker.poll() is None
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                if args.past_the_retries:
                    work = root / "past-the-retries"
                    retries = {"PREFECT_CLIENT_MAX_RETRIES": "2"}
                    row = measure(home, port, url, data, work, "publish", 60, started, retries, True, worker, log)
                    restarts.append(row.pop("_restart"))
                    row["stage"] = "publish, the run's retries cut to 2"
                    row["worker_alive"] = worker.poll() is None
                    row["reused"] = "every input matches" in log.read_text()
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    finally:
        for restart in reversed(restarts):
            restart.__exit__(None, None, None)
    print(f"logs in {root}")
    table = [
        "| stage the server was killed in | outage (s) | run's end state | ended (s after the restart) "
        "| its process gone (s after the restart) | run directories | tasks left unfinished | worker alive "
        "| the same run again | state message |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        message = row["message"].replace("|", "/").splitlines()[0][:120] if row["message"] else ""
        table.append(
            f"| {row['stage']} | {row['outage_s']} | {row['state']} | {row['ended_after_restart_s']} | "
            f"{row['process_gone_after_restart_s']} | "
            f"{row['run_dirs']} | {row['tasks_left_unfinished']} | {row['worker_alive']} | {_again(row)} | {message} |"
        )
    print("\n".join(table))
    if args.output:
        header = [
            "# A train deployment run against a Prefect server outage, by stage",
            "",
            f"Measured {time.strftime('%Y-%m-%d')} with `benchmarks/server_outage.py --outages {args.outages}"
            + (" --past-the-retries" if args.past_the_retries else "")
            + "`: a real `prefect server start` (SQLite), the project's deployments and a process worker; a "
            f"`train/train` run (gate on, {2 * args.images_per_class} generated images at 224 px, shards of 25) "
            "with the server killed (SIGKILL to its process group) as the stage began, started again on the same "
            "port and PREFECT_HOME after the outage. 'Tasks left unfinished': task runs the server still shows "
            "running a minute after the run ended.",
            "",
        ]
        args.output.write_text("\n".join(header + table) + "\n")


if __name__ == "__main__":
    main()
