"""A run's probably mislabelled training images as people read them: `headstart review`'s lines and
the dashboard's table with thumbnails."""

from __future__ import annotations

import io

import pyarrow as pa

from headstart.errors import HeadstartError
from headstart.registry.runs import LABEL_ISSUES_FILE, Run
from headstart.reporting.plots import thumbnail_image

# Rows of the dashboard's table: each carries a thumbnail inside the artifact.
DASHBOARD_ROWS = 20
THUMBNAIL = 64


def run_label_issues(run: Run) -> pa.Table:
    """The run's flagged images, or a one-line error where it has no label_issues.parquet."""
    table = run.label_issues()
    if table is None:
        raise HeadstartError(
            f"run {run.path.name} has no {LABEL_ISSUES_FILE}: it was trained with --no-label-issues or before "
            "headstart looked for wrong labels; train again to review its labels"
        )
    return table


def review_lines(run: Run, top: int | None = None) -> list[str]:
    """The flagged images, most likely mislabelled first: score, given and suggested label, path."""
    table = run_label_issues(run)
    summary = run.metrics.get("label_issues") or {}
    checked = f" of {summary['train_images']} training images" if "train_images" in summary else ""
    left_out = " (left out of the model's training)" if summary.get("left_out") else ""
    if not table.num_rows:
        return [f"run {run.path.name}: no training image is flagged as probably mislabelled"]
    rows = table.slice(0, top).to_pylist() if top is not None else table.to_pylist()
    given = max(len("given"), *(len(row["given_label"]) for row in rows))
    suggested = max(len("suggested"), *(len(row["suggested_label"]) for row in rows))
    lines = [
        f"run {run.path.name}: {table.num_rows}{checked} flagged as probably mislabelled{left_out}",
        f"{'rank':>5}  {'score':<6}  {'given':<{given}}  {'suggested':<{suggested}}  path",
    ]
    lines += [
        f"{row['rank']:>5}  {row['score']:.4f}  {row['given_label']:<{given}}  {row['suggested_label']:<{suggested}}  "
        f"{row['path']}"
        for row in rows
    ]
    if len(rows) < table.num_rows:
        lines.append(f"… {table.num_rows - len(rows)} more (all of them in {run.path / LABEL_ISSUES_FILE})")
    return lines


def label_issues_markdown(run: Run, limit: int = DASHBOARD_ROWS) -> tuple[str, str] | None:
    """The dashboard's table of the most likely mislabelled training images, a thumbnail of each
    embedded as a data URI (the dashboard cannot open the files), and its description; None for a
    run without the check."""
    from headstart.reporting.dashboard import png_data_uri

    table = run.label_issues()
    if table is None:
        return None
    summary = run.metrics.get("label_issues") or {}
    description = (
        f"{table.num_rows} of {summary.get('train_images', '?')} training images flagged as probably mislabelled"
        + ("; left out of the model's training" if summary.get("left_out") else "")
    )
    if not table.num_rows:
        return (
            f"# Label issues\n\nNo training image of run `{run.path.name}` is flagged as probably mislabelled.",
            description,
        )
    lines = [
        f"# Label issues: the {min(limit, table.num_rows)} most likely of {table.num_rows}",
        "",
        f"`headstart review {run.path.name}` lists them all.",
        "",
        "| rank | image | given label | suggested label | score | self-confidence | file |",
        "|---:|---|---|---|---:|---:|---|",
    ]
    for row in table.slice(0, limit).to_pylist():
        thumbnail = _thumbnail(row["path"])
        image = f"![{row['rank']}]({png_data_uri(thumbnail)})" if thumbnail is not None else "(unreadable)"
        lines.append(
            f"| {row['rank']} | {image} | {row['given_label']} | {row['suggested_label']} | {row['score']:.4f} | "
            f"{row['self_confidence']:.4f} | `{row['path']}` |"
        )
    return "\n".join(lines), description


def _thumbnail(path: str) -> bytes | None:
    """The image within THUMBNAIL × THUMBNAIL as PNG bytes; None where it cannot be read any more."""
    try:
        image = thumbnail_image(path, THUMBNAIL)
    except (OSError, ValueError):
        return None
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()
