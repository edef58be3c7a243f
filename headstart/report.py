"""What the dashboard shows of a run: a markdown report with its plots embedded, a metrics table."""

from __future__ import annotations

import base64

from headstart.gate import GateDecision
from headstart.runs import RUN_FILES, Run


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def report_markdown(run: Run) -> str:
    """The run's figures, plots (as data URIs, which the Prefect UI renders), files and model card."""
    metrics = run.metrics
    images = "\n\n".join(f"### {png.stem.replace('_', ' ')}\n\n![{png.name}]({png_data_uri(png.read_bytes())})" for png in run.plots())
    files = "\n".join(f"- [{name}]({(run.path / name).as_uri()})" for name in RUN_FILES)
    return (f"# headstart run `{run.path.name}`\n\nTest accuracy **{metrics['accuracy']:.4f}** on {metrics['n']} images.\n\n"
            f"{images}\n\n## Files\n\nRun directory: `{run.path}`\n\n{files}\n\n{run.model_card}")


def metrics_rows(metrics: dict) -> list[dict]:
    """One row per class, and one for all of them (macro F1, accuracy): the table artifact. Every
    row has the same columns, since the dashboard takes them from the first row."""
    rows = [{"class": name, "precision": round(values["precision"], 4), "recall": round(values["recall"], 4), "f1": round(values["f1"], 4),
             "support": values["support"], "accuracy": None} for name, values in metrics["per_class"].items()]
    rows.append({"class": "(all)", "precision": None, "recall": None, "f1": round(metrics["macro_f1"], 4), "support": metrics["n"],
                 "accuracy": round(metrics["accuracy"], 4)})
    return rows


def gate_rows(decision: GateDecision) -> list[dict]:
    """The gate's decision as a two-column table: one row per figure, the reason first."""
    figures = {"decision": "promote" if decision.promote else "keep the champion", "reason": decision.reason, **{
        name: value for name, value in decision.to_dict().items() if name not in ("promote", "reason", "notes") and value is not None}}
    rows = [{"figure": name, "value": round(value, 6) if isinstance(value, float) else value} for name, value in figures.items()]
    return rows + [{"figure": "note", "value": note} for note in decision.notes]
