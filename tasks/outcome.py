"""What a training run's outcome tells the Prefect server, best-effort (tasks/reports.py): the
event people react to (headstart.model.promoted / headstart.model.kept), and the champion as the
dashboard shows it (the variable headstart_champion, the artifact headstart-champion)."""

from __future__ import annotations

import socket
import warnings
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from headstart.config import shown
from headstart.errors import HeadstartError
from headstart.promotion.mcnemar import GateDecision
from headstart.registry import versions
from headstart.registry.runs import Run
from headstart.reporting.dashboard import report_markdown
from headstart.reporting.outcome import PROMOTED, champion_headline, champion_record, outcome, state_message
from tasks.events import CHAMPION_ARTIFACT, CHAMPION_VARIABLE, MODEL_KEPT, MODEL_PROMOTED, MODEL_RESOURCE_PREFIX
from tasks.reports import event, markdown_artifact, variable


def publish_champion(artifacts_root: Path) -> dict | None:
    """The registry's champion as the variable headstart_champion and the artifact
    headstart-champion (its report, headed by when and why it became champion); returns what the
    variable holds, or None where there is no champion (or it cannot be read: nothing is sent)."""
    try:
        champion = versions.champion(artifacts_root)
        history = versions.history(artifacts_root)
    except HeadstartError:
        return None
    if champion is None:
        return None
    entry = next((item for item in reversed(history) if item["version"] == champion.path.name), None)
    record = champion_record(champion, artifacts_root, entry)
    variable(CHAMPION_VARIABLE, record)
    with warnings.catch_warnings():
        # A switch by hand (`headstart models promote`) runs in no flow run; Prefect 3.9 takes the
        # artifact all the same, and it is the keyed artifact the dashboard lists that matters.
        warnings.filterwarnings("ignore", message="Artifact creation outside of a flow or task run")
        markdown_artifact(
            key=CHAMPION_ARTIFACT,
            markdown=champion_headline(record)
            + report_markdown(champion, socket.gethostname(), _flow_run_url(champion)),
            description=f"Champion {record['version']}, test accuracy {record['accuracy']:.4f}",
        )
    return record


def _champion_now(artifacts_root: Path, decision: GateDecision) -> tuple[str | None, float | None]:
    """The registry's champion and its accuracy after the decision (another run or a person may
    have switched it meanwhile); the one the gate compared with where the registry cannot be read."""
    try:
        champion = versions.champion(artifacts_root)
    except HeadstartError:
        return decision.champion, decision.champion_accuracy
    if champion is None:
        return None, None
    return champion.path.name, champion.metrics["accuracy"]


def _flow_run_url(run: Run) -> str | None:
    """The dashboard's page of the flow run that trained `run`, where it is known."""
    from prefect.settings import PREFECT_UI_URL

    flow_run_id = run.lineage.flow_run_id if run.lineage is not None else None
    base = PREFECT_UI_URL.value()
    return f"{base}/flow-runs/flow-run/{flow_run_id}" if flow_run_id and base else None


@task(name="announce", cache_policy=NO_CACHE)
def announce(artifacts_root: Path, run_dir: str, decision: GateDecision) -> None:
    """Emits headstart.model.promoted where the gate made the run champion, headstart.model.kept
    where it kept another model (or none) in its place; nothing where the run is the champion
    already. The resource is the run's model; the champion and the gate's figures come with it."""
    run = Run(run_dir)
    version, accuracy = run.path.name, run.metrics["accuracy"]
    happened = outcome(version, decision)
    if happened is None:
        return
    promoted = happened == PROMOTED
    champion, champion_accuracy = _champion_now(artifacts_root, decision)
    resource = {
        "prefect.resource.id": f"{MODEL_RESOURCE_PREFIX}{version}",
        "prefect.resource.name": version,
        "headstart.run-dir": str(run.path),
        "headstart.accuracy": f"{accuracy:.4f}",
        "headstart.champion": champion or "",
        "headstart.champion-accuracy": f"{champion_accuracy:.4f}" if champion_accuracy is not None else "",
        "headstart.artifacts-root": shown(artifacts_root),
    }
    figures = {name: value for name, value in decision.to_dict().items() if name != "drift"}
    payload = {"message": state_message(version, accuracy, decision), "gate": figures}
    event(MODEL_PROMOTED if promoted else MODEL_KEPT, resource, payload)
