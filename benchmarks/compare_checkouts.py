"""Two checkouts of headstart side by side, on the waits a user of the demo command knows.

    uv run python benchmarks/compare_checkouts.py --before DIR --after DIR [--repeats 3] [--port 4291]

For each checkout, taking turns so that both see the same load on the machine:
1. the demo command's first run: `headstart train --data examples/cats-vs-dogs` with an empty
   cache and artifacts root (the backbone converted, every image's features extracted);
2. the same command again: every input cached, the earlier run reused (Prefect's temporary
   server starts and stops with the command);
3. the same command again with a Prefect server running (`headstart server start` once, here on
   `--port`, under a temporary PREFECT_HOME shared by both checkouts).
Each checkout runs with its own code (PYTHONPATH) and this project's environment. Writes
benchmarks/results/compare-checkouts.md (and .json): medians and every attempt.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
RESULTS = PROJECT / "benchmarks" / "results"
WAITS = ("first run", "repeat run", "repeat run, server running")


def _train(code: Path, work: Path, environment: dict[str, str]) -> tuple[float, str]:
    """One demo command run from `code`; its wall time and its last line (the run directory)."""
    command = [sys.executable, "-m", "flows.cli", "train", "--data", str(code / "examples" / "cats-vs-dogs")]
    command += ["--cache-dir", str(work / "cache"), "--artifacts-root", str(work / "artifacts")]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=code, env=environment, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{code}: train failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds, done.stdout.strip().splitlines()[-1]


def _environment(code: Path, home: Path, port: int, server: bool) -> dict[str, str]:
    environment = {**os.environ, "PYTHONPATH": str(code), "PREFECT_HOME": str(home)}
    environment["PREFECT_SERVER_API_PORT"] = str(port)
    environment.pop("PREFECT_API_URL", None)
    if not server:
        environment["PREFECT_SERVER_API_PORT"] = str(port + 1)  # nothing listens there: no server found
    return environment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--after", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--port", type=int, default=4291)
    args = parser.parse_args()
    checkouts = {"before": args.before.resolve(), "after": args.after.resolve()}
    commits = {
        name: subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=code, capture_output=True, text=True
        ).stdout.strip()
        for name, code in checkouts.items()
    }
    times: dict[str, dict[str, list[float]]] = {name: {wait: [] for wait in WAITS} for name in checkouts}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        home = scratch / "prefect-home"
        for attempt in range(args.repeats):
            for name, code in checkouts.items():
                work = scratch / f"{name}-{attempt}"
                times[name]["first run"].append(_train(code, work, _environment(code, home, args.port, False))[0])
                times[name]["repeat run"].append(_train(code, work, _environment(code, home, args.port, False))[0])
        server_environment = _environment(checkouts["after"], home, args.port, True)
        subprocess.run([sys.executable, "-m", "flows.cli", "server", "start"], cwd=checkouts["after"],
                       env=server_environment, check=True, capture_output=True)  # fmt: skip
        try:
            for attempt in range(args.repeats):
                for name, code in checkouts.items():
                    work = scratch / f"{name}-{attempt}"
                    environment = _environment(code, home, args.port, True)
                    times[name]["repeat run, server running"].append(_train(code, work, environment)[0])
        finally:
            subprocess.run([sys.executable, "-m", "flows.cli", "server", "stop"], cwd=checkouts["after"],
                           env=server_environment, capture_output=True)  # fmt: skip
    _write(times, commits, args.repeats)


def _write(times: dict[str, dict[str, list[float]]], commits: dict[str, str], repeats: int) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "compare-checkouts.json").write_text(json.dumps({"commits": commits, "seconds": times}, indent=1))
    lines = [
        "# Two checkouts side by side: the demo command's waits",
        "",
        f"Written by `benchmarks/compare_checkouts.py`: before = {commits['before']}, after = {commits['after']};",
        f"{repeats} attempts each, taking turns; `headstart train --data examples/cats-vs-dogs`.",
        "",
        "| wait | before: median (attempts) | after: median (attempts) | after / before |",
        "|---|---|---|---|",
    ]
    for wait in WAITS:
        before, after = times["before"][wait], times["after"][wait]
        cells = [f"{statistics.median(s):.1f} s ({', '.join(f'{t:.1f}' for t in s)})" for s in (before, after)]
        lines.append(
            f"| {wait} | {cells[0]} | {cells[1]} | {statistics.median(after) / statistics.median(before):.2f} |"
        )
    (RESULTS / "compare-checkouts.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
