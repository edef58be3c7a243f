"""Attacks on the error boundary: a full disk, a read-only or non-folder place, option values out
of range, class names that would make predict's output ambiguous. Each ends in one
`headstart: error:` line naming the path and what to do, exit code 2, no traceback, and nothing
half-written; the places and options are refused before any work starts.

A full or read-only disk is a tmpfs mounted for the test (root only; skipped with the reason
otherwise), unmounted after it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import write_class_images

from flows.cli import main
from headstart.config import TrainConfig
from headstart.errors import file_system_fault, os_error_at
from headstart.registry import versions as registry
from headstart.registry.runs import Run


@pytest.fixture
def mount():
    """Mounts a tmpfs on a folder: `full` fills it to the last byte, `read_only` mounts it so."""
    mounted: list[Path] = []

    def mount_tmpfs(folder: Path, size: str = "1m", read_only: bool = False, full: bool = False) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        folder.mkdir(parents=True, exist_ok=True)
        options = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
        mounted.append(folder)
        if full:
            fill(folder)
        return folder

    yield mount_tmpfs
    for folder in reversed(mounted):
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


FILLER = "filler"


def fill(folder: Path) -> None:
    """Writes into `folder` until its file system has no byte left."""
    try:
        with open(folder / FILLER, "wb", buffering=0) as handle:
            while True:
                handle.write(b"\0" * 65536)
    except OSError as error:
        assert error.errno == errno.ENOSPC
    try:  # what is left of the last block, byte by byte
        with open(folder / (FILLER + "-tail"), "wb", buffering=0) as handle:
            while True:
                handle.write(b"\0")
    except OSError as error:
        assert error.errno == errno.ENOSPC


def listing(folder: Path) -> dict[str, bytes | None]:
    """Every entry under `folder` with a file's bytes (None for a folder), the fillers left out."""
    return {
        str(path.relative_to(folder)): (None if path.is_dir() else path.read_bytes())
        for path in sorted(Path(folder).rglob("*"))
        if not path.name.startswith(FILLER)
    }


def files(folder: Path) -> list[str]:
    """The files under `folder`, the fillers left out (an empty folder is no half-written state)."""
    return [name for name, content in listing(folder).items() if content is not None]


def leftovers(folder: Path) -> list[Path]:
    """Temporary files and staging folders a failed write could have left."""
    return [
        path
        for path in Path(folder).rglob("*")
        if path.name.endswith((".tmp", ".partial")) or ".write-check." in path.name or path.name.startswith(".export-")
    ]


def one_error_line(code: int, captured, *names: object) -> str:
    """Asserts the command's failure was one line naming each of `names`; returns the line."""
    errors = [line for line in captured.err.splitlines() if line.startswith("headstart: error:")]
    assert code == 2, captured.err[-3000:]
    assert "Traceback" not in captured.err and "Traceback" not in captured.out, captured.err[-3000:]
    assert len(errors) == 1, captured.err[-3000:]
    for name in names:
        assert str(name) in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    return write_class_images(
        tmp_path_factory.mktemp("colours") / "data", {"red": (200, 40, 40), "blue": (40, 40, 200)}, per_class=12
    )


def _train_args(data: Path, backbone: Path, artifacts_root: Path, cache_dir: Path, *more: str) -> list[str]:
    return [
        "train",
        "--data",
        str(data),
        "--backbone",
        str(backbone),
        "--image-size",
        "32",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--test-fraction",
        "0.25",
        "--artifacts-root",
        str(artifacts_root),
        "--cache-dir",
        str(cache_dir),
        *more,
    ]


@pytest.fixture(scope="module")
def trained(prefect_harness, colours, tiny_backbone_dir, tmp_path_factory) -> Run:
    """A real run of the flow, the champion of its registry. The tests that run `train` through
    `main` ask for it first: Prefect's logging is then set up here, outside a test's captured output
    (a handler holding a test's closed stream would break every later log line)."""
    from flows.train import train

    place = tmp_path_factory.mktemp("trained")
    config = TrainConfig.smoke(
        data=str(colours),
        backbone=str(tiny_backbone_dir),
        artifacts_root=place / "artifacts",
        cache_dir=place / "cache",
        epochs=2,
        batch_size=8,
        test_fraction=0.25,
        gate=False,
    )
    run = Run(train(**config.flat()))
    registry.promote(config.runtime.artifacts_root, run.path.name, "the first")
    return run


# --- A full disk -------------------------------------------------------------------------------


def test_a_full_disk_under_the_artifacts_root_stops_train_in_one_line_with_nothing_half_written(
    trained, colours, tiny_backbone_dir, tmp_path, mount, capsys
):
    """A full disk under `--artifacts-root`: train says which place is full, and no staging run is left."""
    # Room for the check at the start, none for a run.
    root = mount(tmp_path / "artifacts", size="64k")
    code = main(_train_args(colours, tiny_backbone_dir, root, tmp_path / "cache", "--no-gate"))
    one_error_line(code, capsys.readouterr(), root, "no space left")
    assert listing(root) == {} and leftovers(root) == []


def _full_cache_part(cache: Path, part: str, mount) -> Path:
    return mount(cache / part, full=True)


@pytest.mark.parametrize(
    "part",
    ["features", "backbones"],
    ids=["shard write (train)", "backbone conversion (train, the bundled backbone)"],
)
def test_a_full_disk_under_the_cache_dir_stops_train_in_one_line_with_nothing_half_written(
    part, trained, colours, tiny_backbone_dir, tmp_path, mount, capsys
):
    """A full disk under `--cache-dir` (shard write, backbone conversion): one line naming the place."""
    cache = tmp_path / "cache"
    full = _full_cache_part(cache, part, mount)
    args = _train_args(colours, tiny_backbone_dir, tmp_path / "artifacts", cache, "--no-gate")
    if part == "backbones":  # the bundled backbone is converted into the cache on first use
        args[args.index("--backbone") + 1] = "bundled:mobilenet_v2"
    code = main(args)
    one_error_line(code, capsys.readouterr(), full, "no space left")
    assert files(full) == [] and leftovers(cache) == []
    assert not (tmp_path / "artifacts").exists() or files(tmp_path / "artifacts") == []


def test_a_full_disk_under_the_cache_dir_stops_a_litert_predict_in_one_line(trained, tmp_path, mount, capsys):
    """A full disk under `--cache-dir` (LiteRT write): predict --engine litert names the full place."""
    cache = tmp_path / "cache"
    full = mount(cache / "litert", full=True)
    code = main(
        [
            "predict",
            "--model",
            str(trained.path),
            "--engine",
            "litert",
            "--cache-dir",
            str(cache),
            str(_an_image(tmp_path)),
        ]
    )
    one_error_line(code, capsys.readouterr(), full, "no space left")
    assert files(full) == [] and leftovers(cache) == []


def _an_image(folder: Path) -> Path:
    from PIL import Image

    path = folder / "one.png"
    Image.new("RGB", (40, 40), (200, 40, 40)).save(path)
    return path


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_a_full_disk_under_the_registry_stops_models_promote_in_one_line_with_the_champion_kept(
    fault, trained, tmp_path, mount, capsys
):
    """A full disk under the registry (`models promote`), or a read-only one: the champion and its history stay."""
    root = mount(tmp_path / "artifacts", size="8m")
    for name in ("a", "b"):
        shutil.copytree(trained.path, root / name)
    registry.promote(root, "a", "the first")
    if fault == "full":
        fill(root)
    elif subprocess.run(["mount", "-o", "remount,ro", str(root)], capture_output=True).returncode != 0:
        pytest.skip("cannot remount the tmpfs read-only")
    before = listing(root)
    code = main(["models", "promote", "b", "--artifacts-root", str(root)])
    one_error_line(code, capsys.readouterr(), root, "no space left" if fault == "full" else "read-only")
    assert listing(root) == before and leftovers(root) == []
    assert registry.champion(root).path.name == "a"


def test_a_full_disk_under_the_predict_output_stops_predict_in_one_line_with_the_old_file_kept(
    trained, tmp_path, mount, capsys
):
    """A full disk under `predict --output`: one line naming the file; an earlier output stays whole."""
    out = mount(tmp_path / "out", size="64k")
    (out / "predictions.csv").write_text("path,label,probability\nold,red,1.0\n")
    many = tmp_path / "images"
    many.mkdir()
    for index in range(200):
        shutil.copy(_an_image(tmp_path), many / f"a-very-long-name-so-the-rows-take-room-{index:04d}.png")
    fill(out)
    before = listing(out)
    code = main(["predict", "--model", str(trained.path), "--output", str(out / "predictions.csv"), str(many)])
    one_error_line(code, capsys.readouterr(), out / "predictions.csv", "no space left")
    assert listing(out) == before and leftovers(out) == []


# --- A read-only place, or a file where a folder belongs -------------------------------------------


@pytest.mark.parametrize("kind", ["read-only", "a file"])
@pytest.mark.parametrize("option", ["--artifacts-root", "--cache-dir"])
def test_a_read_only_or_non_folder_place_stops_train_before_any_work(
    option, kind, trained, colours, tiny_backbone_dir, tmp_path, mount, capsys
):
    """A read-only or non-directory `--artifacts-root` / `--cache-dir`: refused before the scan, in one line."""
    places = {"--artifacts-root": tmp_path / "artifacts", "--cache-dir": tmp_path / "cache"}
    bad = places[option]
    if kind == "read-only":
        mount(bad, read_only=True)
    else:
        bad.write_text("not a folder\n")
    code = main(_train_args(colours, tiny_backbone_dir, places["--artifacts-root"], places["--cache-dir"]))
    line = one_error_line(code, capsys.readouterr(), option, bad)
    assert ("read-only" in line) if kind == "read-only" else ("not a folder" in line)
    # Refused before any work: nothing scanned, extracted or written, not even the other place's folder.
    assert [place for place in places.values() if place != bad and place.exists()] == []
    assert listing(bad) == {} if kind == "read-only" else bad.read_text() == "not a folder\n"


@pytest.mark.parametrize("option", ["artifacts_root", "cache_dir"])
def test_a_deployment_run_checks_its_places_at_the_flow_s_start(option, trained, colours, tiny_backbone_dir, tmp_path):
    """A non-directory artifacts root or cache dir given as flow parameters (a deployment's run): refused first."""
    from flows.train import train
    from headstart.errors import HeadstartError

    places = {"artifacts_root": tmp_path / "artifacts", "cache_dir": tmp_path / "cache"}
    places[option].write_text("not a folder\n")
    config = TrainConfig.smoke(data=str(colours), backbone=str(tiny_backbone_dir), **places)
    with pytest.raises(HeadstartError, match="not a folder"):
        train(**config.flat())
    assert not places["cache_dir" if option == "artifacts_root" else "artifacts_root"].exists()


@pytest.mark.parametrize("kind", ["read-only", "its folder a file", "a folder"])
def test_a_read_only_or_non_folder_output_stops_predict_before_any_work(kind, trained, tmp_path, mount, capsys):
    """A read-only or non-directory `--output`: refused before predicting, in one line naming it."""
    if kind == "read-only":
        output = mount(tmp_path / "out", read_only=True) / "predictions.csv"
    elif kind == "its folder a file":
        (tmp_path / "out").write_text("not a folder\n")
        output = tmp_path / "out" / "predictions.csv"
    else:
        output = tmp_path / "predictions.csv"
        output.mkdir()
    code = main(["predict", "--model", str(trained.path), "--output", str(output), str(_an_image(tmp_path))])
    captured = capsys.readouterr()
    one_error_line(code, captured, output.parent if kind != "a folder" else output)
    assert "predictions written" not in captured.err


# --- Option values -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, named",
    [
        (["train", "--data", "{data}", "--seed", "-1"], "--seed -1:"),
        (["train", "--data", "{data}", "--seed", str(2**32)], f"--seed {2**32}:"),
        (["train", "--data", "{data}", "--threads", "-1"], "--threads -1:"),
        (["train", "--data", ""], "--data '':"),
        (["train", "--data", "  "], "--data '  ':"),
        (["predict", "--batch-size", "0", "{data}"], "--batch-size 0:"),
        (["predict", "--batch-size", "-1", "{data}"], "--batch-size -1:"),
        (["predict", "--threads", "-1", "{data}"], "--threads -1:"),
        (["evaluate", "--model", "{run}", "--data", "{data}", "--batch-size", "-1"], "--batch-size -1:"),
        (["evaluate", "--model", "{run}", "--data", "{data}", "--batch-size", "0"], "--batch-size 0:"),
        (["evaluate", "--model", "{run}", "--data", ""], "--data '':"),
        (["predict", "", "--model", "{run}"], "an empty input"),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else value,
)
def test_an_option_value_out_of_range_is_refused_before_any_work(args, named, colours, tmp_path, capsys):
    """`--seed` outside 0…2**32−1, `--batch-size` 0 or −1, `--threads -1`, `--data ""`: one line, no work.

    An empty path would be the working directory: `--data ""` would scan the project."""
    places = ["--artifacts-root", str(tmp_path / "artifacts"), "--cache-dir", str(tmp_path / "cache")]
    filled = [arg.format(data=colours, run=tmp_path) for arg in args]
    code = main(filled + (places if args[0] != "evaluate" else []))
    one_error_line(code, capsys.readouterr(), named)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "artifacts").exists()


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_a_flow_parameter_out_of_range_is_refused_by_the_config(seed, trained, colours, tmp_path):
    """`--seed` outside 0…2**32−1 given to the flow or a deployment: refused by the flow's parameters."""
    from pydantic import ValidationError

    from flows.train import train

    with pytest.raises(ValidationError, match="seed"):
        TrainConfig(data=str(colours), seed=seed)
    assert TrainConfig(data=str(colours), seed=2**32 - 1).head.seed == 2**32 - 1
    # The flow's parameters carry the config's constraints: refused before the flow body runs.
    with pytest.raises(Exception, match="seed"):
        train(data=str(colours), seed=seed, cache_dir=tmp_path / "cache", artifacts_root=tmp_path / "artifacts")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "artifacts").exists()


@pytest.mark.parametrize("inputs", ["empty folder", "no image in it"])
def test_predict_with_nothing_to_label_says_why_in_one_line(inputs, trained, tmp_path, capsys):
    """`predict` on an empty folder: exit 2 with one line naming the folder, and no output file written."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    if inputs == "no image in it":
        (folder / "notes.txt").write_text("not an image\n")
    output = tmp_path / "predictions.csv"
    code = main(["predict", "--model", str(trained.path), "--output", str(output), str(folder)])
    one_error_line(code, capsys.readouterr(), folder, "no image to label")
    assert not output.exists()


# --- Class names that would make the output ambiguous -------------------------------------------


@pytest.mark.parametrize("character", ["\t", "\n"], ids=["tab", "newline"])
def test_a_class_folder_whose_name_holds_a_tab_or_newline_is_refused_at_scan_time(
    character, trained, tiny_backbone_dir, tmp_path, capsys
):
    """Class names with a tab or newline (predict's TSV ambiguous): refused at the scan in one line."""
    data = write_class_images(tmp_path / "data", {f"red{character}wine": (200, 40, 40), "blue": (40, 40, 200)}, 6)
    code = main(_train_args(data, tiny_backbone_dir, tmp_path / "artifacts", tmp_path / "cache", "--no-gate"))
    line = one_error_line(code, capsys.readouterr(), "tab or line break", repr(str(data / f"red{character}wine")))
    assert "\n" not in line
    assert not (tmp_path / "artifacts").exists() or listing(tmp_path / "artifacts") == {}


# --- The boundary itself -------------------------------------------------------------------------


def test_only_anticipated_file_system_failures_become_one_line_and_each_names_its_path():
    """A genuine bug keeps its traceback: only the anticipated errnos are mapped, each naming its path."""
    for number in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENOTDIR, errno.EACCES, errno.EPERM, errno.EISDIR):
        fault = file_system_fault(OSError(number, os.strerror(number), "/some/place"))
        assert fault is not None and "/some/place" in str(fault) and ":" in str(fault)
    assert file_system_fault(FileNotFoundError(errno.ENOENT, "gone", "/x")) is None
    assert file_system_fault(OSError(errno.EIO, "i/o", "/x")) is None
    assert file_system_fault(ValueError("no")) is None
    # A write() names no file; the boundary says which place instead. Other errors stay themselves.
    assert os_error_at(OSError(errno.ENOSPC, "full"), "/root").filename == "/root"
    assert os_error_at(shutil.Error([("a", "b", "[Errno 28] No space left on device: 'b'")]), "/r").errno == 28
    assert os_error_at(RuntimeError("No space left on device"), "/r") is None


def test_a_file_system_fault_raised_by_a_bug_elsewhere_keeps_its_traceback(tmp_path, monkeypatch):
    """An OSError the boundary does not know (here ENOENT from a bug) is re-raised, not hidden."""
    import flows.cli

    def broken(args):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(tmp_path / "gone"))

    monkeypatch.setattr(flows.cli, "_server", broken)
    with pytest.raises(FileNotFoundError):
        main(["server", "status"])


def test_write_json_atomic_names_the_destination_when_the_disk_is_full(tmp_path, mount):
    """A full disk under a JSON write: the error names the destination, never its temporary, and leaves nothing."""
    from headstart.infra.storage import write_json_atomic

    full = mount(tmp_path / "full", full=True)
    with pytest.raises(OSError) as raised:
        write_json_atomic(full / "state.json", {"a": 1})
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(full / "state.json")
    assert listing(full) == {} and json.dumps(listing(full)) == "{}"


@pytest.mark.e2e
def test_a_full_disk_inside_the_flow_is_one_line_in_a_real_process_with_prefect_s_own_logs(
    colours, tiny_backbone_dir, tmp_path, mount
):
    """A full disk under `--cache-dir` met inside the flow (shard write), as a user runs it: Prefect's own
    log lines carry no traceback either, and the command ends with the one line."""
    import sys

    from servers import PROJECT, prefect_env

    full = mount(tmp_path / "cache" / "features", full=True)
    args = _train_args(colours, tiny_backbone_dir, tmp_path / "artifacts", tmp_path / "cache")
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=600,
        env=prefect_env(tmp_path / "prefect"),
    )
    captured = SimpleNamespace(out=result.stdout, err=result.stderr)
    one_error_line(result.returncode, captured, full, "no space left")
    assert files(full) == [] and leftovers(tmp_path / "cache") == []
