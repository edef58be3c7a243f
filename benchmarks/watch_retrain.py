"""From new data to a finished retrain, through the deployments as a team runs them: a real Prefect
server (SQLite), `prefect deploy --all`, a process worker. The bundled cats-vs-dogs set less 50
images per class is trained first (`train/train`, defaults); the `watch` deployment looks at it
twice (its first look records it, the second finds it unchanged); the 100 images held back are
copied in; the next look emits headstart.data.changed and the `retrain` deployment's trigger
retrains. Writes benchmarks/results/watch-retrain.md.

    uv run python benchmarks/watch_retrain.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from servers import PROJECT, api, prefect_env, prefect_server, process_worker  # noqa: E402

HELD_BACK = 50


def when(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def main() -> None:
    load = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="headstart-watch-retrain-"))
    home = work / "prefect-home"
    home.mkdir()
    data, held = work / "data", work / "held-back"
    for name in ("cat", "dog"):
        images = sorted((ROOT / "examples" / "cats-vs-dogs" / name).iterdir())
        images = [image for image in images if image.suffix.lower() in (".png", ".jpg", ".jpeg")]
        for target, chosen in ((data, images[HELD_BACK:]), (held, images[:HELD_BACK])):
            (target / name).mkdir(parents=True)
            for image in chosen:
                shutil.copy(image, target / name / image.name)
    places = {"artifacts_root": str(work / "artifacts"), "cache_dir": str(work / "cache")}
    try:
        with prefect_server(home) as url:
            env = prefect_env(home, f"{url}/api", PWD=str(PROJECT), COLUMNS="250")

            def prefect(*args: str) -> str:
                done = subprocess.run(
                    [sys.executable, "-m", "prefect", *args], cwd=PROJECT, env=env, capture_output=True, text=True
                )
                assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
                return done.stdout

            def deployment(name: str) -> dict:
                return next(d for d in api(url, "/deployments/filter", {}) if d["name"] == name)

            def run(name: str, **parameters) -> dict:
                options = [i for k, v in parameters.items() for i in ("--param", f"{k}={json.dumps(v)}")]
                output = prefect("deployment", "run", name, *options, "--watch", "--watch-interval", "1")
                return api(url, f"/flow_runs/{output.split('UUID: ', 1)[1].split()[0]}")

            prefect("work-pool", "create", "headstart", "--type", "process")
            prefect("work-queue", "create", "training", "--pool", "headstart", "--limit", "1")
            prefect("deploy", "--all")
            watch = deployment("watch")
            for schedule in watch["schedules"]:
                api(url, f"/deployments/{watch['id']}/schedules/{schedule['id']}", {"active": False}, "PATCH")
            retrain = deployment("retrain")
            api(url, f"/deployments/{retrain['id']}", {"parameters": {**retrain["parameters"], **places}}, "PATCH")
            with process_worker(home, f"{url}/api", "headstart", work / "worker.log"):
                first = run("train/train", data=str(data), **places)
                looks = [run("watch/watch", data=str(data), cache_dir=places["cache_dir"]) for _ in range(2)]
                for name in ("cat", "dog"):
                    for image in (held / name).iterdir():
                        shutil.copy(image, data / name / image.name)
                asked = time.time()
                look = run("watch/watch", data=str(data), cache_dir=places["cache_dir"])
                while True:
                    runs = api(url, "/flow_runs/filter", {"deployments": {"id": {"any_": [retrain["id"]]}}})
                    if runs and runs[0]["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED"):
                        break
                    time.sleep(1)
                (triggered,) = runs
                events = api(url, "/events/filter", {"filter": {"event": {"name": ["headstart.data.changed"]}}})
                (event,) = events["events"]
                run_dir = Path(json.loads(Path(triggered["state"]["data"]["storage_key"]).read_text()))
                gate = json.loads((run_dir / "lineage.json").read_text())["gate"]
        rows = [
            ("first train, 1 900 images (flow run)", when(first["end_time"]) - when(first["start_time"])),
            ("watch: first look (flow run)", when(looks[0]["end_time"]) - when(looks[0]["start_time"])),
            ("watch: unchanged folder (flow run)", when(looks[1]["end_time"]) - when(looks[1]["start_time"])),
            ("watch: 100 images added (flow run)", when(look["end_time"]) - when(look["start_time"])),
            ("event → retrain started", when(triggered["start_time"]) - when(event["occurred"])),
            ("retrain (flow run)", when(triggered["end_time"]) - when(triggered["start_time"])),
            ("watch run asked for → retrain finished", when(triggered["end_time"]) - asked),
        ]
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        lines = [
            "# From new data to a finished retrain (benchmarks/watch_retrain.py)",
            "",
            f"Commit {commit.stdout.strip()}, {os.cpu_count()} cores, load average before the run "
            f"{load:.1f}; SQLite server, process worker polling every 2 s; defaults (160 px).",
            f"Retrain: {triggered['state']['type']}; gate: {gate['reason']}",
            "",
            "| step | seconds |",
            "|---|---|",
            *[f"| {label} | {seconds:.1f} |" for label, seconds in rows],
            "",
        ]
        (ROOT / "benchmarks" / "results" / "watch-retrain.md").write_text("\n".join(lines))
        print("\n".join(lines))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
