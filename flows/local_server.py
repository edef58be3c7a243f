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
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from headstart.errors import HeadstartError

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
