"""What headstart sends the Prefect server for people to watch (tables, markdown, progress),
sent best-effort: the work never waits long for the dashboard, and never fails because of it.

A call that cannot reach the server is dropped with one warning per run, not raised; after a
failure, further reports are skipped for a while rather than each waiting out its own timeout.
A report is retried once, briefly, whatever PREFECT_CLIENT_MAX_RETRIES says: that setting is
raised for the run's own state updates, so that a run outlives a server outage (prefect.yaml),
and each of its retries would hold up the work a progress bar reports on."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable
from uuid import UUID

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.context import SettingsContext, get_settings_context
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger
from prefect.settings import PREFECT_CLIENT_MAX_RETRIES

_logger = logging.getLogger("headstart.reports")
# After a failed report, the next ones are skipped for this long: a progress bar updated every
# second must not stall the work it reports on while the server is away.
QUIET_SECONDS = 30.0
# Retries of one report (Prefect's client backs off 2 s, 4 s, … between them).
REPORT_RETRIES = 1


def _run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The run's logger where there is a run (its log reaches the dashboard once the server is
    back: the run retries it), else headstart's own."""
    try:
        return get_run_logger()
    except MissingContextError:
        return _logger


class _Reachability:
    def __init__(self) -> None:
        self.failed_at: float | None = None
        self.warned = False

    def skipping(self) -> bool:
        return self.failed_at is not None and time.monotonic() - self.failed_at < QUIET_SECONDS

    def failed(self, what: str, error: BaseException) -> None:
        self.failed_at = time.monotonic()
        if not self.warned:
            self.warned = True
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            _run_logger().warning(
                "headstart: the Prefect server did not take the %s (%s); the dashboard misses it, the work goes on",
                what,
                first_line,
            )

    def succeeded(self) -> None:
        if self.failed_at is not None:
            _run_logger().info("headstart: the Prefect server takes reports again")
        self.failed_at = None


_state = _Reachability()
# The run's settings and the same with REPORT_RETRIES (building them anew takes longer than a report).
_few_retries: list = [None, None]


def _with_few_retries(send: Callable[[], Any]) -> Any:
    context = get_settings_context()
    if _few_retries[0] is not context.settings:
        _few_retries[:] = [
            context.settings,
            context.settings.copy_with_update(updates={PREFECT_CLIENT_MAX_RETRIES: REPORT_RETRIES}),
        ]
    with SettingsContext(profile=context.profile, settings=_few_retries[1]):
        return send()


def _best_effort(what: str, send: Callable[[], Any]) -> Any:
    if _state.skipping():
        return None
    try:
        result = _with_few_retries(send)
    except Exception as error:  # noqa: BLE001 - a report must never fail the work
        _state.failed(what, error)
        return None
    _state.succeeded()
    return result


def table_artifact(key: str, rows: list[dict], description: str) -> None:
    """A table artifact of the current run (best-effort)."""
    _best_effort(f"table {key}", lambda: create_table_artifact(key=key, table=rows, description=description))


def markdown_artifact(key: str, markdown: str, description: str) -> None:
    """A markdown artifact of the current run (best-effort)."""
    _best_effort(f"report {key}", lambda: create_markdown_artifact(key=key, markdown=markdown, description=description))


def progress_artifact(progress: float, description: str) -> UUID | None:
    """A progress artifact of the current run (best-effort); None where the server did not take it."""
    return _best_effort("progress", lambda: create_progress_artifact(progress, description=description))


def update_progress(artifact: UUID | None, progress: float, description: str) -> None:
    """Moves a progress artifact (best-effort); nothing where the server never took the bar."""
    if artifact is None:
        return
    _best_effort("progress", lambda: update_progress_artifact(artifact, progress, description=description))


def variable(name: str, value: dict) -> None:
    """Sets a Prefect variable to a JSON value, replacing the one there (best-effort)."""
    from prefect.variables import Variable

    _best_effort(f"variable {name}", lambda: Variable.set(name, value, overwrite=True))


def event(name: str, resource: dict[str, str], payload: dict) -> None:
    """Emits a Prefect event (best-effort); inside a run, Prefect relates it to the flow run,
    its flow and deployment."""
    from prefect.events import emit_event

    _best_effort(f"event {name}", lambda: emit_event(event=name, resource=resource, payload=payload))
