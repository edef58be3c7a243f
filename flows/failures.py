"""Failures a user can put right, said in one line wherever a flow runs: the `headstart` command
and a worker's flow run alike.

An expected failure (a HeadstartError, a file-system fault a user can fix, a parameter the config
rejects) ends a flow run Failed with the one line as its state message, logged once at ERROR and
without a traceback; Prefect's own reports of it (the task's, the flow's and the engine's, each
with its traceback) are left out. A genuine bug keeps its traceback everywhere.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, TypeVar

Body = TypeVar("Body", bound=Callable)


def expected_failure(error: BaseException | None, flags: bool = False) -> str | None:
    """The one line that says what to put right, for a failure a user can fix; None for a bug.
    A rejected config option is named as the command line spells it with `flags` (`--epochs`),
    else as the flow's parameter (`epochs`)."""
    from pydantic import ValidationError

    from headstart.errors import HeadstartError, file_system_fault, first_line

    if isinstance(error, ValidationError):
        return "; ".join(
            f"{_option_name(e['loc'], flags)}: {e['msg'].removeprefix('Value error, ')}" for e in error.errors()
        )
    if isinstance(error, HeadstartError):
        return first_line(error)
    fault = file_system_fault(error) if error is not None else None
    return first_line(fault) if fault is not None else None


def _option_name(location: tuple, flags: bool) -> str:
    """The option a validation error is about (`--extraction-batch-size`, or the flow's parameter
    `extraction_batch_size`, for the backbone section's batch_size), or its location in the config
    where it is no option."""
    from headstart.config import TrainConfig

    flat = {(section, name): option for option, (section, name, _) in TrainConfig.options().items()}
    option = flat.get(tuple(location[:2])) if len(location) == 2 else (location[0] if len(location) == 1 else None)
    if isinstance(option, str) and not (flags and option == "inputs"):
        return "--" + option.replace("_", "-") if flags else option
    return ".".join(map(str, location)) or "config"


def unreachable_api(error: BaseException | None) -> bool:
    """Whether an error is the Prefect API not answering (no connection, a timeout, a 5xx)."""
    import httpx

    if isinstance(error, httpx.HTTPStatusError):
        return error.response.status_code >= 500
    return isinstance(error, httpx.TransportError) or (
        isinstance(error, RuntimeError) and str(error).startswith("Failed to reach API")
    )


class NoTracebackForExpectedFailures(logging.Filter):
    """Prefect logs a failed task or flow run with its traceback, and the engine that ran it again.
    For an expected failure the flow says the one line itself (one_line_failures): Prefect's
    reports of it are left out. A Prefect server that stopped answering is one line too."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is None:
            return True
        expected = expected_failure(error) is not None
        if expected and record.name.startswith("prefect"):
            return False
        if expected or unreachable_api(error):
            record.exc_info, record.exc_text = None, None
            message = record.getMessage().strip()
            record.msg, record.args = message.splitlines()[0] if message else "", ()
        return True


def install_log_filter(*others: logging.Filter) -> None:
    """NoTracebackForExpectedFailures (and `others`) on every handler of every logger there is,
    once each."""
    wanted = [NoTracebackForExpectedFailures(), *others]
    for name in [None, *logging.root.manager.loggerDict]:
        logger = logging.getLogger(name)
        for handler in getattr(logger, "handlers", []):
            for new in wanted:
                if not any(type(present) is type(new) for present in handler.filters):
                    handler.addFilter(new)


def one_line_failures(body: Body) -> Body:
    """A flow's body whose expected failures end the run Failed with the one line as its state
    message, logged once at ERROR. The original error stays the state's data, so a caller of the
    flow (the `headstart` command) gets it raised back as before; a bug is raised as it is."""

    @functools.wraps(body)
    def run(*args, **kwargs):
        from prefect import get_run_logger
        from prefect.states import Failed

        install_log_filter()
        try:
            return body(*args, **kwargs)
        except Exception as error:
            line = expected_failure(error)
            if line is None:
                raise
            get_run_logger().error(line)
            return Failed(message=line, data=error)

    return run
