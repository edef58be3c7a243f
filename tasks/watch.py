"""Prefect tasks around headstart.data.changes: a look at a data folder, and the event that says
it changed."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from headstart.data.changes import DataChange, looking_at
from headstart.errors import HeadstartError
from tasks.events import DATA_CHANGED, DATA_RESOURCE_PREFIX


@task(name="look_at_data", retries=0, cache_policy=NO_CACHE)
def look_at_data(data: str, cache_dir: Path) -> DataChange:
    """Fingerprints the folder; emits `headstart.data.changed` where it changed since the last look."""
    with looking_at(Path(data), cache_dir) as change:
        if change.changed and emit_data_changed(change, by="watch") is None:
            # Not recorded, so the next look finds the change again.
            raise HeadstartError(f"Prefect did not send the event {DATA_CHANGED} about {change.path}")
    return change


def emit_data_changed(change: DataChange, by: str):
    """The event `headstart.data.changed` about the change's folder; `by` says who noticed
    (`watch`, `headstart data changed`). Returns the event, or None where Prefect sent none."""
    return emit_event(
        event=DATA_CHANGED,
        resource={
            "prefect.resource.id": f"{DATA_RESOURCE_PREFIX}{change.path}",
            "prefect.resource.name": Path(change.path).name,
            "headstart.data.path": change.path,
            "headstart.data.fingerprint": change.fingerprint,
        },
        payload={**change.payload(), "noticed_by": by},
    )
