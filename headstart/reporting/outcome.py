"""How a training run's outcome reads where people look first: the flow run's state message, the
first line of a candidate's report, what is known of the champion, and which event the outcome is
(headstart.model.promoted, headstart.model.kept, or none)."""

from __future__ import annotations

from pathlib import Path

from headstart.config import shown
from headstart.promotion.mcnemar import GateDecision
from headstart.registry.runs import Run

PROMOTED = "promoted"
KEPT = "kept"


def outcome(version: str, decision: GateDecision | None) -> str | None:
    """PROMOTED where the run became the champion, KEPT where the gate kept another model (or none)
    in its place, None where nothing was decided: the gate was off, or the run repeats the
    champion's inputs and is the champion already."""
    if decision is None:
        return None
    if decision.promote:
        return PROMOTED
    if decision.champion == version:
        return None
    return KEPT


def state_message(version: str, accuracy: float, decision: GateDecision | None) -> str:
    """One line for the flow run's state: what became of the run, and the figures that decided it."""
    if decision is None:
        return f"{version} not promoted (gate off): test accuracy {accuracy:.4f}"
    if decision.promote:
        if decision.champion is None:
            accuracy, floor = decision.candidate_accuracy, decision.floor
            return f"promoted {version}, the first champion: {accuracy:.4f} vs floor {floor:.4f}"
        return (
            f"promoted {version}: {decision.candidate_accuracy:.4f} vs {decision.champion_accuracy:.4f} "
            f"({decision.champion}), p = {decision.p_value:.3g}"
        )
    if decision.champion == version:
        return f"{version} is the champion already; nothing changed"
    champion, candidate = decision.champion_accuracy, decision.candidate_accuracy
    if champion is not None and decision.p_value is not None and decision.reason.startswith("kept champion"):
        tolerance = decision.tolerance or 0.0
        if candidate < champion - tolerance:
            return f"kept champion {decision.champion}: candidate {version} {candidate:.4f} < {champion:.4f}"
        return (
            f"kept champion {decision.champion}: candidate {version} {candidate:.4f} vs {champion:.4f}, "
            f"shown worse (p = {decision.p_value:.3g})"
        )
    return f"{version} not promoted: {decision.reason}"


def report_headline(version: str, decision: GateDecision | None) -> str:
    """The first line of a run's report where the run did not become the champion: that it was not
    promoted, and why; empty where it was."""
    if decision is None:
        return (
            f"**Not promoted:** the gate was off for this run; "
            f"`headstart models promote {version}` makes it the champion.\n\n"
        )
    if outcome(version, decision) == KEPT:
        return f"**Not promoted:** {decision.reason}.\n\n"
    return ""


def champion_record(run: Run, artifacts_root: Path, entry: dict | None = None) -> dict:
    """What the dashboard keeps of the champion (a Prefect variable's JSON value): its version,
    accuracy, run directory and registry, and the registry's record of the switch, where known."""
    record = {
        "version": run.path.name,
        "accuracy": run.metrics["accuracy"],
        "test_images": run.metrics["n"],
        "run_dir": str(run.path),
        "artifacts_root": shown(artifacts_root),
    }
    if entry is not None:
        record.update(since=entry["at"], reason=entry["reason"], by=entry["by"], previous=entry["previous"])
    return record


def champion_headline(record: dict) -> str:
    """The first line of the champion's report."""
    since = f" since {record['since']} ({record['by']}: {record['reason']})" if "since" in record else ""
    return (
        f"**Champion** of the registry in `{record['artifacts_root']}`{since}; "
        f"`headstart models` lists every version.\n\n"
    )
