"""`headstart serve`: the deployments of prefect.yaml, served from one process (Prefect's
`serve`) for a user without a work pool and a worker. prefect.yaml stays their one description:
names, entry points, parameters, schedules, triggers and tags are read from it."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

PROJECT = Path(__file__).resolve().parents[1]


def project_deployments(project_file: Path = PROJECT / "prefect.yaml") -> list:
    """Prefect RunnerDeployments for every deployment of the project file."""
    from prefect.events import DeploymentEventTrigger
    from prefect.flows import load_flow_from_entrypoint
    from prefect.schedules import Cron, Interval

    deployments = []
    for entry in yaml.safe_load(project_file.read_text())["deployments"]:
        path, function = entry["entrypoint"].rsplit(":", 1)
        flow = load_flow_from_entrypoint(f"{project_file.parent / path}:{function}")
        schedules = [
            Cron(schedule["cron"], timezone=schedule.get("timezone"), active=schedule.get("active", True))
            if "cron" in schedule
            else Interval(schedule["interval"], active=schedule.get("active", True))
            for schedule in entry.get("schedules") or []
        ]
        deployments.append(
            flow.to_deployment(
                name=entry["name"],
                description=entry.get("description"),
                tags=entry.get("tags"),
                parameters=entry.get("parameters") or {},
                schedules=schedules,
                triggers=[DeploymentEventTrigger(**trigger) for trigger in entry.get("triggers") or []],
            )
        )
    return deployments


def serve_project() -> None:
    """Serves the project's deployments until interrupted, one run at a time (as the worker's
    `training` queue allows), from the project root, where their relative paths point."""
    from prefect import serve

    os.chdir(PROJECT)
    serve(*project_deployments(), limit=1)
