"""What the dashboard shows of a run: a markdown report with its plots embedded, a metrics table."""

from __future__ import annotations

import base64

from headstart.evaluation import drift
from headstart.promotion.mcnemar import GateDecision
from headstart.registry.model_card import calibration_line, near_duplicates_summary
from headstart.registry.runs import DATA_REPORT_FILE, RUN_FILES, Run

# Files listed one by one in the data table; the rest are counted in one row (all are in the data report).
DATA_TABLE_FILES = 500


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def report_markdown(run: Run, host: str, flow_run_url: str | None = None, headline: str = "") -> str:
    """The run's figures, plots (as data URIs, which the Prefect UI renders), gate decision, where
    its files are and its model card. The files stay on `host`, the machine that ran the flow: a
    dashboard in a browser cannot open them, so they are named, not linked; the link goes to
    the flow run's own page, with every artifact of the run. `headline` goes first (whether the run
    is the champion: headstart.reporting.outcome)."""
    metrics = run.metrics
    images = "\n\n".join(
        f"### {png.stem.replace('_', ' ')}\n\n![{png.name}]({png_data_uri(png.read_bytes())})" for png in run.plots()
    )
    gate = run.lineage.gate if run.lineage is not None else None
    decision = f"**Gate:** {GateDecision.from_dict(gate).reason}.\n\n" if gate else ""
    near_duplicates = run.data_report.get("near_duplicates")
    leakage = f"**Near-duplicates:** {near_duplicates_summary(near_duplicates)}\n\n" if near_duplicates else ""
    tuned = run.fine_tuning
    fine_tuning = (
        (
            f"**Fine-tuned** from stage {tuned.from_stage} in {tuned.epochs_run} epochs "
            f"(epoch {tuned.best_epoch} kept): validation "
            f"accuracy {tuned.validation_accuracy_before:.4f} with the head alone, "
            f"{tuned.validation_accuracy_after:.4f} fine-tuned.\n\n"
        )
        if tuned is not None
        else ""
    )
    calibration = f"**Probabilities:** {calibration_line(metrics)}\n\n" if "calibration" in metrics else ""
    files = "\n".join(f"- `{name}`" for name in RUN_FILES)
    this_run = f" All of this run's artifacts: [its flow run]({flow_run_url})." if flow_run_url else ""
    return (
        f"{headline}# headstart run `{run.path.name}`\n\n"
        f"Test accuracy **{metrics['accuracy']:.4f}** on {metrics['n']} images.{this_run}\n\n"
        f"{fine_tuning}{calibration}{decision}{leakage}{images}\n\n"
        f"## Files\n\nOn `{host}`, in `{run.path}`:\n\n{files}\n\n"
        f"`headstart models` lists this run as version `{run.path.name}`; "
        f"`headstart predict --model {run.path.name} FOLDER` labels images with it.\n\n"
        f"{run.model_card}"
    )


def run_tables(run: Run) -> list[tuple[str, list[dict], str]]:
    """The run's table artifacts as (key, rows, description): the test metrics per class, the files
    left out with their reasons, and the near-duplicates where the run checked for them."""
    metrics, data = run.metrics, run.data_report
    used = sum(sum(counts.values()) for counts in data["counts"].values())
    tables = [
        ("headstart-metrics", metrics_rows(metrics), "Test-split metrics per class"),
        (
            "headstart-data",
            data_rows(data),
            f"{used} images used, {len(data['skipped'])} files skipped, from {data['source']}",
        ),
    ]
    near_duplicates = data.get("near_duplicates")
    if near_duplicates is not None:  # runs from before the check have none
        test = near_duplicates["splits"]["test"]
        tables.append(
            (
                "headstart-near-duplicates",
                near_duplicate_rows(near_duplicates),
                f"{test['flagged']} of {test['images']} test images have a training image "
                f"at cosine similarity ≥ {near_duplicates['threshold']}",
            )
        )
    return tables


def metrics_rows(metrics: dict) -> list[dict]:
    """One row per class, and one for all of them (macro F1, accuracy): the table artifact. Every
    row has the same columns, since the dashboard takes them from the first row."""
    rows = [
        {
            "class": name,
            "precision": round(values["precision"], 4),
            "recall": round(values["recall"], 4),
            "f1": round(values["f1"], 4),
            "support": values["support"],
            "accuracy": None,
            "balanced_accuracy": None,
        }
        for name, values in metrics["per_class"].items()
    ]
    rows.append(
        {
            "class": "(all)",
            "precision": None,
            "recall": None,
            "f1": round(metrics["macro_f1"], 4),
            "support": metrics["n"],
            "accuracy": round(metrics["accuracy"], 4),
            "balanced_accuracy": round(metrics["balanced_accuracy"], 4) if "balanced_accuracy" in metrics else None,
        }
    )
    return rows


def data_rows(data_report: dict) -> list[dict]:
    """The files a run left out, each with its reason, and the data report's notes: the data table."""
    skipped = data_report["skipped"]
    rows = [{"file": entry["path"], "reason": entry["reason"]} for entry in skipped[:DATA_TABLE_FILES]]
    if len(skipped) > DATA_TABLE_FILES:
        rows.append(
            {"file": f"({len(skipped) - DATA_TABLE_FILES} more files)", "reason": f"listed in {DATA_REPORT_FILE}"}
        )
    rows += [{"file": "(note)", "reason": note} for note in data_report["notes"]]
    return rows or [{"file": "(none)", "reason": "every file was used"}]


def near_duplicate_rows(near_duplicates: dict) -> list[dict]:
    """Every flagged pair, most similar first within each split: the near-duplicates table. Every
    row has the same columns; with no pairs, one row saying so."""
    rows = [
        {
            "split": split,
            "similarity": round(pair["similarity"], 4),
            "image": pair["path"],
            "class": pair["label"],
            "nearest_training_image": pair["train_path"],
            "its_class": pair["train_label"],
        }
        for split, check in near_duplicates["splits"].items()
        for pair in check["pairs"]
    ]
    return rows or [
        {
            "split": ", ".join(near_duplicates["splits"]),
            "similarity": None,
            "image": f"no near-duplicates at or above {near_duplicates['threshold']}",
            "class": None,
            "nearest_training_image": None,
            "its_class": None,
        }
    ]


def gate_rows(decision: GateDecision) -> tuple[list[dict], str]:
    """The gate's table artifact as (rows, description). The rows are two columns of short figures,
    the decision first, so that the table fits the dashboard's pane; the sentences (the reason,
    the notes, the drift note) go to the description, which the dashboard wraps."""
    figures = {
        "decision": "promote" if decision.promote else "keep the champion",
        **{
            name: value
            for name, value in decision.to_dict().items()
            if name not in ("promote", "reason", "notes", "drift") and value is not None
        },
    }
    if decision.drift is not None:
        figures |= {
            f"drift: {name}": decision.drift[name] for name in DRIFT_FIGURES if decision.drift.get(name) is not None
        }
    rows = [
        {"figure": name, "value": round(value, 6) if isinstance(value, float) else value}
        for name, value in figures.items()
    ]
    sentences = [*decision.notes, *([f"drift: {drift.summary(decision.drift)}"] if decision.drift is not None else [])]
    description = decision.reason + "".join(f"\n- {sentence}" for sentence in sentences)
    return rows, description


DRIFT_FIGURES = (
    "new_images",
    "images_gone",
    "mean_feature_shift",
    "mean_feature_shift_by_chance",
    "new_images_mean_feature_shift",
    "new_images_shift_by_chance",
)
