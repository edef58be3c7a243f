"""Progress a person watching the dashboard can see: a Prefect progress artifact that moves as
work is done, and a console bar where there is a terminal (none in a worker's logs)."""

from __future__ import annotations

import time

from tqdm import tqdm

from tasks.reports import progress_artifact, update_progress


class DashboardProgress:
    """Counts work done (`update(n)`, as a tqdm bar does) into a progress artifact of the current
    run, written at most once every `interval` seconds and when the work is complete."""

    def __init__(self, total: int, description: str, unit: str = "img", interval: float = 1.0):
        self.total, self.description, self.interval = max(total, 1), description, interval
        self.done = 0
        self._written_at = time.monotonic()
        self._bar = tqdm(
            total=total, desc=description, unit=unit, disable=None
        )  # None: no bar unless stderr is a terminal
        self._artifact = progress_artifact(0.0, description)

    def update(self, n: int = 1, description: str | None = None) -> None:
        self.done += n
        self._bar.update(n)
        if description is not None:
            self.description = description
        if self.done >= self.total or time.monotonic() - self._written_at >= self.interval:
            self._write()

    def finish(self, description: str | None = None) -> None:
        """Marks the work complete (training that stopped early did all it was going to do)."""
        self.done = self.total
        self.description = description or self.description
        self._write()

    def _write(self) -> None:
        self._written_at = time.monotonic()
        progress = min(100.0, 100.0 * self.done / self.total)
        if self._artifact is None:  # the server did not take the bar when the work began: it may now
            self._artifact = progress_artifact(progress, self.description)
        else:
            update_progress(self._artifact, progress, self.description)

    def __enter__(self) -> "DashboardProgress":
        return self

    def __exit__(self, *_) -> None:
        self._bar.close()
