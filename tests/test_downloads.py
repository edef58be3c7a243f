"""Broken downloads and hostile archives, for the CIFAR-10 archive and for TF Hub modules, against
a real HTTP server on 127.0.0.1 that misbehaves on purpose (tests/misbehaving_http.py)."""

import hashlib
import io
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
import types
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from configs import source_of
from misbehaving_http import FAULTS, STALL_MID_FILE, TRICKLE, MisbehavingServer
from test_data import make_cifar_archive

from headstart.backbone.handles import download_hub_module, fingerprint_module, resolve_backbone
from headstart.config import TrainConfig
from headstart.data.cifar10 import fetch_cifar10_archive
from headstart.data.manifest import DataReport
from headstart.errors import HeadstartError
from headstart.infra.downloads import DownloadPolicy, download

FAST = DownloadPolicy(attempts=3, backoff_seconds=0.01, timeout=0.3)
RETRIED = ("timeout", "http 500", "reset mid-file", "short body")
# urllib follows a redirect to the same URL this many times before giving up; one attempt's worth.
REDIRECT_LOOP_HITS = urllib.request.HTTPRedirectHandler.max_repeats + 1

EXPECTED_ERRORS = {
    ("timeout", "cifar archive"): r"could not download .*: no response within 0\.3 s \(3 attempts\)$",
    ("timeout", "tf hub module"): r"could not load backbone .*: no response within 0\.3 s \(3 attempts\)$",
    ("http 404", "cifar archive"): r"could not download .*: HTTP 404 Not Found$",
    ("http 404", "tf hub module"): r"could not load backbone .*: HTTP 404 Not Found$",
    ("http 500", "cifar archive"): r"could not download .*: HTTP 500 Internal Server Error \(3 attempts\)$",
    ("http 500", "tf hub module"): r"could not load backbone .*: HTTP 500 Internal Server Error \(3 attempts\)$",
    ("reset mid-file", "cifar archive"): r"could not download .*: the server reset the connection \(3 attempts\)$",
    ("reset mid-file", "tf hub module"): r"could not load backbone .*: the server reset the connection \(3 attempts\)$",
    (
        "short body",
        "cifar archive",
    ): r"could not download .*: the server sent \d+ of the \d+ bytes it announced \(3 attempts\)$",
    (
        "short body",
        "tf hub module",
    ): r"could not load backbone .*: the server sent \d+ of the \d+ bytes it announced \(3 attempts\)$",
    (
        "wrong content",
        "cifar archive",
    ): r"did not serve a usable CIFAR-10 archive: not a readable tar\.gz .*; it was removed from the cache$",
    ("wrong content", "tf hub module"): r"could not load backbone .*: not a readable tar archive",
    ("redirect loop", "cifar archive"): r"could not download .*: too many redirects \(the last was HTTP 302\)$",
    ("redirect loop", "tf hub module"): r"could not load backbone .*: too many redirects \(the last was HTTP 302\)$",
}


@pytest.fixture
def misbehaving():
    servers = []

    def start(payload: bytes, fault: str | None, failures: int | None = None) -> MisbehavingServer:
        servers.append(MisbehavingServer(payload, fault, failures))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def _tar_gz(add_members) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        add_members(tar)
    return buffer.getvalue()


def _add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def module_archive(tiny_backbone_dir) -> bytes:
    def add(tar):
        for item in sorted(tiny_backbone_dir.iterdir()):
            tar.add(item, arcname=item.name)

    return _tar_gz(add)


@pytest.fixture(scope="module")
def cifar_archive(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("cifar") / "cifar-10-python.tar.gz"
    make_cifar_archive(path)
    return path.read_bytes()


class CifarArchive:
    """The CIFAR-10 archive as a training run fetches it, from a URL into its cache."""

    name = "cifar-10-python.tar.gz"

    def __init__(self, payload: bytes):
        self.payload = payload

    def fetch(self, url: str, cache_dir: Path) -> None:
        archive = fetch_cifar10_archive(url, cache_dir, DataReport(source=url, class_names=[]), FAST)
        assert archive.read_bytes() == self.payload


class HubModule:
    """A compressed TF Hub module as a training run resolves it, from a URL into its cache."""

    name = "module.tar.gz"

    def __init__(self, payload: bytes, module_dir: Path):
        self.payload = payload
        self.fingerprint = fingerprint_module(module_dir)

    def fetch(self, url: str, cache_dir: Path) -> None:
        module = download_hub_module(url, cache_dir / "tfhub", FAST)
        assert fingerprint_module(module) == self.fingerprint


@pytest.fixture(params=["cifar archive", "tf hub module"])
def source(request):
    if request.param == "cifar archive":
        return request.param, CifarArchive(request.getfixturevalue("cifar_archive"))
    return request.param, HubModule(
        request.getfixturevalue("module_archive"), request.getfixturevalue("tiny_backbone_dir")
    )


def _files_left(cache_dir: Path) -> list[Path]:
    return [path for path in cache_dir.rglob("*") if not path.is_dir() or path.name.endswith(".tmp")]


@pytest.mark.parametrize("fault", FAULTS)
def test_a_fault_that_persists_is_one_clear_error_that_leaves_nothing_behind(fault, source, misbehaving, tmp_path):
    kind, fetched = source
    server = misbehaving(fetched.payload, fault)
    cache_dir = tmp_path / "cache"
    with pytest.raises(HeadstartError, match=EXPECTED_ERRORS[fault, kind]) as raised:
        fetched.fetch(server.url(fetched.name), cache_dir)
    assert "\n" not in str(raised.value)
    expected_hits = {"redirect loop": REDIRECT_LOOP_HITS, "http 404": 1, "wrong content": 1}.get(fault, FAST.attempts)
    assert server.hits == expected_hits
    assert _files_left(cache_dir) == []

    server.heal()
    hits_before = server.hits
    fetched.fetch(server.url(fetched.name), cache_dir)  # the failure left nothing that a later call reuses
    assert server.hits == hits_before + 1


@pytest.mark.parametrize("fault", RETRIED)
def test_a_fault_that_clears_is_retried_with_backoff(fault, source, misbehaving, tmp_path):
    kind, fetched = source
    server = misbehaving(fetched.payload, fault, failures=1)
    fetched.fetch(server.url(fetched.name), tmp_path / "cache")
    assert server.hits == 2
    assert not list((tmp_path / "cache").rglob("*.tmp"))


# What each source's download runs in a process of its own, to be killed halfway.
FETCH_IN_A_CHILD = {
    "cifar archive": "from headstart.data.cifar10 import fetch_cifar10_archive; "
    "from headstart.data.manifest import DataReport; "
    "fetch_cifar10_archive(URL, CACHE, DataReport(source=URL, class_names=[]))",
    "tf hub module": (
        "from headstart.backbone.handles import download_hub_module; download_hub_module(URL, CACHE / 'tfhub')"
    ),
}


def test_a_download_killed_halfway_is_never_used_and_what_it_left_is_cleared_later(source, misbehaving, tmp_path):
    kind, fetched = source
    server = misbehaving(fetched.payload, STALL_MID_FILE, failures=1)
    cache_dir, url = tmp_path / "cache", server.url(fetched.name)
    code = f"from pathlib import Path; URL, CACHE = {url!r}, Path({str(cache_dir)!r}); " + FETCH_IN_A_CHILD[kind]
    child = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).parents[1])
    try:
        deadline = time.monotonic() + 60
        while not (server.hits and [path for path in cache_dir.rglob("*.tmp") if path.is_file()]):
            assert child.poll() is None and time.monotonic() < deadline, "the download never started"
            time.sleep(0.05)
        time.sleep(0.2)  # half the file is on its way
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    left = sorted(cache_dir.rglob("*.tmp"))
    assert left and not [path for path in cache_dir.rglob("*") if path.is_file() and ".tmp" not in str(path)]

    an_hour_and_more_ago = time.time() - 2 * 3600  # what the killed writer left has not changed since
    for path in [*left, *(entry for path in left if path.is_dir() for entry in path.rglob("*"))]:
        os.utime(path, (an_hour_and_more_ago, an_hour_and_more_ago), follow_symlinks=False)
    fetched.fetch(url, cache_dir)
    assert server.hits == 2 and not list(cache_dir.rglob("*.tmp"))


def test_a_temporary_file_still_being_written_is_not_taken_for_a_dead_one(tmp_path):
    from headstart.infra.storage import remove_stale_temporaries

    (tmp_path / "staging.1.tmp").mkdir()
    (tmp_path / "staging.1.tmp" / "part").write_bytes(b"written a moment ago")
    os.utime(tmp_path / "staging.1.tmp", (0, 0))  # the folder's own time is old; what is inside is new
    (tmp_path / ".file.2.tmp").write_bytes(b"old")
    os.utime(tmp_path / ".file.2.tmp", (0, 0))
    assert remove_stale_temporaries(tmp_path, "staging.*.tmp") == []
    assert remove_stale_temporaries(tmp_path, ".file.*.tmp") == [tmp_path / ".file.2.tmp"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["staging.1.tmp"]


def test_the_backoff_doubles_between_attempts(misbehaving, tmp_path, monkeypatch):
    import headstart.infra.downloads

    waits = []
    monkeypatch.setattr(headstart.infra.downloads.time, "sleep", waits.append)
    server = misbehaving(b"payload", "http 500")
    with pytest.raises(HeadstartError, match=r"HTTP 500 .*\(4 attempts\)"):
        download(server.url("file.bin"), tmp_path / "file.bin", policy=DownloadPolicy(attempts=4, backoff_seconds=0.5))
    assert waits == [0.5, 1.0, 2.0]
    assert server.hits == 4


def test_a_server_that_trickles_is_given_up_at_the_deadline_mid_file(misbehaving, tmp_path):
    """A byte every 0.05 s never lets a read stall for the 0.3 s timeout, and 10 000 bytes would take
    8 minutes: the download stops at its 1 s deadline, is not tried again, and leaves nothing."""
    server = misbehaving(bytes(10_000), TRICKLE)
    started = time.monotonic()
    with pytest.raises(
        HeadstartError, match=r"could not download .*: not complete within 1 s \(\d+ bytes of 10000 received\)$"
    ):
        download(
            server.url("file.bin"),
            tmp_path / "file.bin",
            policy=DownloadPolicy(attempts=3, backoff_seconds=0.01, timeout=0.3, deadline_seconds=1.0),
        )
    assert time.monotonic() - started < 5 and server.hits == 1
    assert list(tmp_path.iterdir()) == []


def test_no_attempt_starts_that_the_deadline_leaves_no_time_for(misbehaving, tmp_path):
    """Waits of 0.2 s and 0.4 s fit in a 1 s deadline; the 0.8 s before a fourth attempt does not."""
    server = misbehaving(b"payload", "http 500")
    with pytest.raises(HeadstartError, match=r"HTTP 500 .*\(3 attempts; no time left for another within 1 s\)$"):
        download(
            server.url("file.bin"),
            tmp_path / "file.bin",
            policy=DownloadPolicy(attempts=10, backoff_seconds=0.2, deadline_seconds=1.0),
        )
    assert server.hits == 3


def test_a_download_is_checked_against_its_checksum_before_it_is_kept(misbehaving, tmp_path):
    payload = b"the expected file" * 100
    checksum = "md5:" + hashlib.md5(payload).hexdigest()
    server = misbehaving(payload, "wrong content")
    target = tmp_path / "cache" / "file.bin"
    with pytest.raises(HeadstartError, match=r"its md5 is [0-9a-f]{32}, expected [0-9a-f]{32}; it was not kept$"):
        download(server.url("file.bin"), target, checksum=checksum, policy=FAST)
    assert server.hits == 1  # the same server would send the same wrong file again
    assert _files_left(tmp_path / "cache") == []

    server.heal()
    assert download(server.url("file.bin"), target, checksum=checksum, policy=FAST).read_bytes() == payload
    download(server.url("file.bin"), target, checksum=checksum, policy=FAST)
    assert server.hits == 2  # a cached file that matches is not fetched again
    target.write_bytes(b"damaged since")
    assert download(server.url("file.bin"), target, checksum=checksum, policy=FAST).read_bytes() == payload
    assert server.hits == 3  # one that no longer matches is


# --- One retry layer: the downloader's, not the Prefect tasks' --------------------------------


def test_the_data_tasks_leave_retrying_to_the_downloader():
    """Prefect retrying the tasks too would multiply the downloader's attempts on a failure it
    gave up on, and rerun a bug; the downloader alone knows which failures are transient."""
    import tasks.data

    for task in (tasks.data.download, tasks.data.prepare_backbone):
        assert (task.retries, task.retry_condition_fn) == (0, None), task.name


@pytest.fixture
def waits(monkeypatch) -> list[float]:
    """The downloader's backoff waits, recorded instead of slept."""
    import headstart.infra.downloads

    recorded = []
    monkeypatch.setattr(
        headstart.infra.downloads, "time", types.SimpleNamespace(monotonic=time.monotonic, sleep=recorded.append)
    )
    return recorded


def _through_the_data_tasks(kind: str, url: str, cache_dir: Path, cifar_archive: bytes):
    """What the flow's data tasks run on a source at url, their functions without Prefect around them
    and the downloader's default policy: the download task for the CIFAR-10 archive, the
    prepare_backbone task for a TF Hub module (its manifest from a CIFAR-10 archive on disk)."""
    import tasks.data

    if kind == "cifar archive":
        config = TrainConfig(data="cifar10", cifar10_source=url, cache_dir=cache_dir)
        return tasks.data.download.fn(config.data, cache_dir)
    local = cache_dir.parent / "cifar-10-python.tar.gz"
    local.write_bytes(cifar_archive)
    config = TrainConfig(data="cifar10", cifar10_source=str(local), backbone=url, image_size=32, cache_dir=cache_dir)
    manifest, _ = tasks.data.download.fn(config.data, cache_dir)
    return tasks.data.prepare_backbone.fn(config.backbone, manifest, cache_dir)


@pytest.mark.parametrize("fault", ["http 500", "reset mid-file"])
def test_a_transient_failure_in_a_data_task_is_retried_once_by_the_downloader_and_the_task_succeeds(
    fault, source, cifar_archive, misbehaving, waits, tmp_path
):
    kind, fetched = source
    server = misbehaving(fetched.payload, fault, failures=1)
    result = _through_the_data_tasks(kind, server.url(fetched.name), tmp_path / "cache", cifar_archive)
    assert server.hits == 2 and waits == [DownloadPolicy().backoff_seconds]
    if kind == "tf hub module":
        assert result.fingerprint == fetched.fingerprint
    else:
        manifest, report = result
        assert report.counts["test"] == {"cat": 2, "dog": 2}


@pytest.mark.parametrize("fault", ["http 404", "wrong content"])
def test_a_bad_source_fails_a_data_task_at_once_with_one_request(
    fault, source, cifar_archive, misbehaving, waits, tmp_path
):
    kind, fetched = source
    server = misbehaving(fetched.payload, fault)
    with pytest.raises(HeadstartError, match=EXPECTED_ERRORS[fault, kind]):
        _through_the_data_tasks(kind, server.url(fetched.name), tmp_path / "cache", cifar_archive)
    assert server.hits == 1 and waits == []


# --- Hostile archives --------------------------------------------------------------------------


def _member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    return info


ESCAPE = "../../../../escaped"  # from the folder a module is unpacked in, up past the test's cache

HOSTILE_MEMBERS = {
    "absolute path": (lambda root: _member(str(root / "escaped")), "has an absolute path"),
    "'..' component": (lambda root: _member(ESCAPE), "has a '..' component"),
    "character device": (lambda root: _member("null", tarfile.CHRTYPE), "is a character device"),
    "block device": (lambda root: _member("disk", tarfile.BLKTYPE), "is a block device"),
    "fifo": (lambda root: _member("pipe", tarfile.FIFOTYPE), "is a FIFO"),
    "absolute symlink": (
        lambda root: _member("variables/passwd", tarfile.SYMTYPE, "/etc/passwd"),
        "is a symlink to '/etc/passwd', outside the destination",
    ),
    "symlink up and out": (
        lambda root: _member("variables/escaped", tarfile.SYMTYPE, "../" + ESCAPE),
        "is a symlink to '../../../../../escaped', outside the destination",
    ),
    "hard link out": (
        lambda root: _member("linked", tarfile.LNKTYPE, "../../x"),
        "is a hard link to '../../x', outside the destination",
    ),
}


@pytest.mark.parametrize("hostile", HOSTILE_MEMBERS)
def test_a_module_archive_with_a_hostile_member_is_refused_and_nothing_is_unpacked(
    hostile, tiny_backbone_dir, misbehaving, tmp_path
):
    make_member, problem = HOSTILE_MEMBERS[hostile]
    member = make_member(tmp_path)

    archive = _tar_gz(lambda tar: _add_hostile(tar, tiny_backbone_dir, member))
    server = misbehaving(archive, None)
    cache_dir = tmp_path / "cache"
    with pytest.raises(
        HeadstartError, match=r"could not load backbone .*: archive member (.+) " + re.escape(problem) + "$"
    ) as raised:
        resolve_backbone(server.url("module.tar.gz"), 32, cache_dir, FAST)
    assert repr(member.name) in str(raised.value)
    assert _files_left(cache_dir) == []
    assert not list(tmp_path.rglob("escaped*"))


def _add_module(tar: tarfile.TarFile, module_dir: Path) -> None:
    for item in sorted(module_dir.iterdir()):
        tar.add(item, arcname=item.name)


def _add_hostile(tar: tarfile.TarFile, module_dir: Path, member: tarfile.TarInfo) -> None:
    _add_module(tar, module_dir)  # a complete module first, so that a partial unpacking would show
    if member.isreg():
        data = b"written where it must not be"
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    else:
        tar.addfile(member)


def test_a_module_archive_that_unpacks_to_more_than_the_disk_has_free_is_refused(
    tiny_backbone_dir, misbehaving, tmp_path, monkeypatch
):
    import collections
    import shutil

    import headstart.infra.archives

    zeros = 64 << 20
    archive = _tar_gz(lambda tar: (_add_module(tar, tiny_backbone_dir), _add_file(tar, "zeros.bin", bytes(zeros))))
    assert len(archive) < zeros // 100  # a compression bomb: a small download, a large unpacking
    free = zeros // 2
    real_disk_usage = shutil.disk_usage
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(
        headstart.infra.archives.shutil, "disk_usage", lambda path: usage(real_disk_usage(path).total, 0, free)
    )
    server = misbehaving(archive, None)
    with pytest.raises(
        HeadstartError, match=rf"the archive unpacks to \d+ bytes, more than the {free} free in .*tfhub"
    ):
        resolve_backbone(server.url("module.tar.gz"), 32, tmp_path / "cache", FAST)
    assert _files_left(tmp_path / "cache") == []


def test_a_module_archive_without_a_savedmodel_is_refused(misbehaving, tmp_path):
    server = misbehaving(
        _tar_gz(lambda tar: _add_file(tar, "model/saved_model.pb", b"nested one level too deep")), None
    )
    with pytest.raises(HeadstartError, match=r"no saved_model\.pb at its top level$"):
        resolve_backbone(server.url("module.tar.gz"), 32, tmp_path / "cache", FAST)
    assert _files_left(tmp_path / "cache") == []


def test_a_good_module_archive_is_unpacked_once_and_loads(module_archive, tiny_backbone_dir, misbehaving, tmp_path):
    server = misbehaving(module_archive, None)
    url = server.url("module.tar.gz")
    first = resolve_backbone(url, 32, tmp_path / "cache", FAST)
    again = resolve_backbone(url, 32, tmp_path / "cache", FAST)
    assert server.hits == 1
    assert again.module_path == first.module_path
    assert first.fingerprint == fingerprint_module(tiny_backbone_dir)
    images = np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32)
    reference = resolve_backbone(str(tiny_backbone_dir), 32, tmp_path).keras_layer()(images).numpy()
    np.testing.assert_array_equal(first.keras_layer()(images).numpy(), reference)


def test_the_cifar_archive_is_read_member_by_member_and_never_extracted(tmp_path):
    """Its batches are found by file name wherever the archive puts them, and read in memory: a
    member's path never decides where anything is written."""
    clean = tmp_path / "clean.tar.gz"
    make_cifar_archive(clean)
    hostile = tmp_path / "hostile.tar.gz"
    with tarfile.open(clean) as source, tarfile.open(hostile, "w:gz") as tar:
        for member in source.getmembers():
            data = source.extractfile(member).read()
            member.name = str(tmp_path / "escaped" / Path(member.name).name)
            tar.addfile(member, io.BytesIO(data))
        tar.addfile(_member("cifar-10-batches-py/passwd", tarfile.SYMTYPE, "/etc/passwd"))
        tar.addfile(_member("cifar-10-batches-py/null", tarfile.CHRTYPE))
    config = TrainConfig(data="cifar10", cifar10_source=str(hostile), cache_dir=tmp_path / "cache")
    _, report = source_of(config)
    assert report.counts["test"] == {"cat": 2, "dog": 2}
    assert not [path for path in tmp_path.rglob("*") if path.name in ("escaped", "passwd", "null")]


@pytest.mark.e2e
def test_the_cli_reports_a_broken_download_and_a_hostile_module_in_one_line(colour_folder, misbehaving, tmp_path):
    import subprocess
    import sys

    from servers import PROJECT, prefect_env

    def train(*args: str) -> list[str]:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "flows.cli",
                "train",
                *args,
                "--image-size",
                "32",
                "--no-gate",
                "--artifacts-root",
                str(tmp_path / "artifacts"),
                "--cache-dir",
                str(tmp_path / "cache"),
            ],
            cwd=PROJECT,
            capture_output=True,
            text=True,
            timeout=600,
            env=prefect_env(tmp_path / "prefect"),
        )
        assert "Traceback" not in result.stderr and result.returncode == 2, result.stderr[-3000:]
        return [line for line in result.stderr.splitlines() if line.startswith("headstart: error:")]

    missing = misbehaving(b"", "http 404")
    assert train("--data", "cifar10", "--cifar10-source", missing.url("cifar-10-python.tar.gz")) == [
        f"headstart: error: could not download {missing.url('cifar-10-python.tar.gz')}: HTTP 404 Not Found"
    ]
    hostile = misbehaving(_tar_gz(lambda tar: tar.addfile(_member(ESCAPE))), None)
    assert train("--data", str(colour_folder), "--backbone", hostile.url("module.tar.gz")) == [
        f"headstart: error: could not load backbone {hostile.url('module.tar.gz')}: "
        f"archive member '{ESCAPE}' has a '..' component"
    ]
    assert missing.hits == 1
