"""A local Prefect server kept running between commands, so that a run does not pay for a
temporary server's start every time, and its dashboard stays up.

`prefect server start --background` would do it, but it leaves the server writing into pipes
nobody reads: the server dies at its first log line once the starting command has exited. This
starts the same server detached from the terminal, its output in a log file under PREFECT_HOME.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

from headstart.errors import HeadstartError, first_line

PID_FILE = "headstart-server.pid"
LOG_FILE = "headstart-server.log"


def _address() -> tuple[str, int]:
    """Where Prefect's own settings put a local server (PREFECT_SERVER_API_HOST / _PORT)."""
    from prefect.settings import get_current_settings

    api = get_current_settings().server.api
    return ("127.0.0.1" if api.host in ("0.0.0.0", "::", "") else api.host), api.port


def local_server_url() -> str:
    host, port = _address()
    return f"http://{host}:{port}"


def is_healthy(url: str, timeout: float = 0.5) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/health", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def deployments_api_url() -> str | None:
    """The API of the server the deployments run on: PREFECT_API_URL, else a local server that
    answers (`headstart server start`); None where neither is there. Never a temporary server:
    what is sent to one reaches no worker and no dashboard."""
    from prefect.settings import PREFECT_API_URL

    if api_url := PREFECT_API_URL.value():
        return api_url
    url = local_server_url()
    return f"{url}/api" if is_healthy(url) else None


def api_problem(timeout: float = 3.0) -> str | None:
    """Why the Prefect API that PREFECT_API_URL names cannot take a run's reports, or None when
    it answers its health check. Asked once, without Prefect's retries, through Prefect's own
    client (which carries a Prefect Cloud key)."""
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_REQUEST_TIMEOUT, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    with temporary_settings({PREFECT_CLIENT_MAX_RETRIES: 0, PREFECT_API_REQUEST_TIMEOUT: timeout}):
        with get_client(sync_client=True) as client:
            error = client.api_healthcheck()
    if error is None:
        return None
    if isinstance(error, httpx.HTTPStatusError):
        return f"its health check answers HTTP {error.response.status_code}"
    if isinstance(error, httpx.TimeoutException):
        return f"no answer within {timeout:g} s"
    cause = getattr(error, "__cause__", None) or error
    return first_line(cause).removeprefix("[Errno 111] ").lower()


def home_problem() -> str | None:
    """Why Prefect could not write its home (PREFECT_HOME, where a temporary server keeps its
    database), or None when it can. Checked before any work: a temporary server that cannot
    create its database otherwise only times out, long after."""
    from prefect.settings import get_current_settings

    home = Path(get_current_settings().home)
    try:
        home.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=home):
            pass
    except OSError as error:
        return f"{home}: {error.strerror or first_line(error)}"
    return None


@contextlib.contextmanager
def temporary_server(home: Path | None = None, timeout: float | None = None) -> Iterator[str]:
    """A Prefect server for this process only, as Prefect starts one when no API is configured,
    its database in PREFECT_HOME (or in `home`); yields its API URL. Logs and events still on
    their way are sent before it stops, so that none is sent to a stopped server."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_HOME,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )

    with temporary_settings({PREFECT_HOME: home} if home else {}, restore_defaults={PREFECT_API_URL}):
        # On a port of its own: Prefect's default instance may be another's (a test harness).
        server = SubprocessASGIServer(port=_free_port())
        try:
            server.start(timeout=timeout or PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
        except Exception as error:
            server.stop()
            raise HeadstartError(f"the temporary Prefect server did not start: {first_line(error)[:300]}") from None
        try:
            with temporary_settings({PREFECT_API_URL: server.api_url}):
                yield server.api_url
                _send_pending_reports()
        finally:
            server.stop()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _send_pending_reports() -> None:
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    with contextlib.suppress(Exception):
        APILogWorker.drain_all()
    with contextlib.suppress(Exception):
        EventsWorker.drain_all()


def _home() -> Path:
    from prefect.settings import get_current_settings

    home = Path(get_current_settings().home)
    home.mkdir(parents=True, exist_ok=True)
    return home


def start(timeout: float = 180) -> str:
    """Starts the server unless one answers already; returns its URL once it is healthy."""
    host, port = _address()
    url = f"http://{host}:{port}"
    if is_healthy(url):
        return url
    home = _home()
    with open(home / LOG_FILE, "ab") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    (home / PID_FILE).write_text(str(server.pid))
    deadline = time.monotonic() + timeout
    while not is_healthy(url, timeout=2):
        if server.poll() is not None or time.monotonic() > deadline:
            raise HeadstartError(f"the Prefect server did not start; see {home / LOG_FILE}")
        time.sleep(0.5)
    return url


def stop() -> bool:
    """Stops a server this module started; False when there was none."""
    pid_file = _home() / PID_FILE
    if not pid_file.is_file():
        return False
    pid = int(pid_file.read_text())
    pid_file.unlink()
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    for _ in range(60):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.5)
    os.killpg(pid, signal.SIGKILL)
    return True
