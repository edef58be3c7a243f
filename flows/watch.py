"""The `watch` flow: look_at_data, which fingerprints a data folder and emits
`headstart.data.changed` when it changed since the last look (the `retrain` deployment's trigger
starts a retrain on it). Cheap enough to run every few minutes: an unchanged folder costs a
listing and a stat per file."""

from __future__ import annotations

from prefect import flow
from prefect.states import Completed

from flows.parameters import parameters_from
from headstart.config import WatchConfig
from tasks.watch import look_at_data


@flow(name="watch", log_prints=True)
@parameters_from(WatchConfig)
def watch(**parameters):
    """Looks at a data folder; emits headstart.data.changed where it changed. The parameters are
    WatchConfig's fields (see headstart.config)."""
    config = WatchConfig(**parameters)
    change = look_at_data(config.data, config.cache_dir)
    summary = change.summary() + ("; headstart.data.changed emitted" if change.changed else "")
    print(f"headstart: {summary}")
    # The message says in the runs list whether this look found a change.
    return Completed(message=summary, data=summary)
