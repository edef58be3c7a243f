"""Real servers for the end-to-end tests, started and always torn down by them: a Prefect server
(SQLite, or a PostgreSQL the helper starts in a temporary directory) and a process worker."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

PROJECT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def prefect_env(home: Path, api_url: str | None = None, **extra: str) -> dict[str, str]:
    """The environment of a Prefect command for this server: its own PREFECT_HOME, no analytics."""
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **extra}
    env.pop("PREFECT_API_URL", None)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def _stop(process: subprocess.Popen) -> None:
    """Stops a process and everything it started (a worker's flow runs, a server's services)."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


@contextlib.contextmanager
def prefect_server(
    home: Path, database_url: str | None = None, started: list | None = None, port: int | None = None
) -> Iterator[str]:
    """`prefect server start` on `port` (default: a free 127.0.0.1 port); yields its base URL (the
    API is at /api). Its process (leader of its own process group) is appended to `started`, for a
    test to kill; a server started again on the same port and PREFECT_HOME is the same server."""
    port = port or free_port()
    # The dashboard calls the API at PREFECT_UI_API_URL, which defaults to port 4200.
    extra = {"PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api"}
    if database_url:
        extra["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    log_path = home / "server.log"
    with open(log_path, "a") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=prefect_env(home, **extra),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if started is not None:
            started.append(server)
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_until_healthy(url, server, log_path)
            yield url
        finally:
            _stop(server)


def _wait_until_healthy(url: str, server: subprocess.Popen, log_path: Path, timeout: float = 180) -> None:
    from flows.local_server import is_healthy

    deadline = time.monotonic() + timeout
    while not is_healthy(url, timeout=2):
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"prefect server did not start: {log_path.read_text()[-2000:]}")
        time.sleep(1)


@contextlib.contextmanager
def process_worker(home: Path, api_url: str, pool: str, log_path: Path) -> Iterator[subprocess.Popen]:
    """`prefect worker start --pool POOL` from the project root, polling every 2 s."""
    env = prefect_env(home, api_url, PREFECT_WORKER_QUERY_SECONDS="2", PREFECT_WORKER_PREFETCH_SECONDS="2")
    with open(log_path, "w") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool],
            cwd=PROJECT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield worker
        finally:
            _stop(worker)


def postgres_binaries() -> Path | None:
    """Where PostgreSQL's initdb and pg_ctl are: on PATH, or in Debian's /usr/lib/postgresql/N/bin."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(os.path.realpath(on_path)).parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def postgres_unavailable() -> str | None:
    """Why no PostgreSQL can be started here, or None when it can."""
    if postgres_binaries() is None:
        return "PostgreSQL's initdb and pg_ctl are not installed (Debian package postgresql; .ci/run installs it)"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser: PostgreSQL refuses to run as root"
    if os.geteuid() == 0:
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run PostgreSQL as"
    return None


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A PostgreSQL cluster in a temporary directory, on a free 127.0.0.1 port, with one database
    for Prefect; yields its asyncpg connection URL. Run as the `postgres` user when this is root,
    since PostgreSQL refuses to run as root."""
    binaries = postgres_binaries()
    as_user: list[str] = []
    directory = Path(tempfile.mkdtemp(prefix="headstart-postgres-"))
    if os.geteuid() == 0:
        import pwd

        user = pwd.getpwnam("postgres")
        os.chown(directory, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    data = directory / "data"

    def run(*command: str) -> None:
        subprocess.run([*as_user, *command], check=True, capture_output=True, text=True, cwd=directory, timeout=120)

    try:
        run(str(binaries / "initdb"), "-D", str(data), "-U", "headstart", "--auth=trust", "-E", "UTF8")
        run(
            str(binaries / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(directory / "postgres.log"),
            "-w",
            "-t",
            "120",
            "-o",
            f"-c listen_addresses=127.0.0.1 -p {port} -k {directory}",
            "start",
        )
        try:
            psql = binaries / "psql" if (binaries / "psql").exists() else Path(shutil.which("psql") or "psql")
            run(
                str(psql),
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-U",
                "headstart",
                "-d",
                "postgres",
                "-c",
                "CREATE DATABASE prefect",
            )
            yield f"postgresql+asyncpg://headstart@127.0.0.1:{port}/prefect"
        finally:
            run(str(binaries / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def api(
    url: str, path: str, body: dict | None = None, method: str | None = None, timeout: float = 30
) -> list | dict | None:
    """One request to the Prefect server at `url` (its API under /api); the answer as JSON."""
    request = urllib.request.Request(
        f"{url}/api{path}",
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method=method,
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        answer = response.read()
    return json.loads(answer) if answer else None
