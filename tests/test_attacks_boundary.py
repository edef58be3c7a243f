"""Attacks on the error boundary: a full disk, a read-only place, a file where a folder belongs,
under every place headstart writes to, and option values out of range. Each ends in one
`headstart: error:` line and exit code 2 that names the path (or the option) and what to do,
found before any work where it can be, with nothing half-written and earlier state intact.

Full and read-only places are tmpfs mounts (the tests skip, saying why, where mounting is not
possible); they are unmounted after each test."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from configs import smoke_config
from conftest import write_class_images

from flows.cli import main
from headstart.errors import HeadstartError, file_system_fault
from headstart.registry import versions as registry

# Temporary files and staging folders of atomic writes (infra.storage, run_writer, hub_module).
LEFTOVERS = (".*.tmp", ".*.partial", ".export-*")


@contextlib.contextmanager
def tmpfs(directory: Path, *options: str):
    """A tmpfs mounted on `directory` with `options` (size=…, ro), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    directory.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", ",".join(["mode=0755", *options]), "tmpfs", str(directory)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield directory
    finally:
        if subprocess.run(["umount", str(directory)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(directory)], check=True)


def fill(directory: Path) -> None:
    """Takes every free byte of the file system `directory` is on."""
    with open(directory / "filler", "wb") as filler:
        try:
            while True:
                filler.write(b"\0" * 65536)
                filler.flush()
        except OSError:
            pass


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under `directory` but the filler, with its content's hash."""
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != "filler"
    }


def leftovers(directory: Path) -> list[Path]:
    return [path for pattern in LEFTOVERS for path in directory.rglob(pattern)]


def one_error_line(capfd, code: int) -> str:
    """The command's only `headstart: error:` line, after checking exit code 2 and no traceback.
    capfd, not capsys: Prefect's log handlers hold the stderr they were made with."""
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err, captured.err[-3000:]
    errors = [line for line in captured.err.splitlines() if line.startswith("headstart: error:")]
    assert code == 2 and len(errors) == 1, (code, captured.err[-3000:])
    return errors[0]


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    return write_class_images(
        tmp_path_factory.mktemp("colours") / "data", {"red": (200, 40, 40), "blue": (40, 40, 200)}, per_class=16
    )


@pytest.fixture(scope="module")
def trained(prefect_harness, colours, tiny_backbone_dir, tmp_path_factory) -> tuple[Path, Path]:
    """A real run of the flow, and the cache it filled (scan, manifest, LiteRT model, shards)."""
    from flows.train import train

    root = tmp_path_factory.mktemp("trained")
    config = smoke_config(
        colours,
        tiny_backbone_dir,
        root,
        epochs=3,
        batch_size=8,
        test_fraction=0.25,
        gate=False,
    )
    return Path(train(**config.flat())), config.runtime.cache_dir


def _train(colours: Path, backbone: str, artifacts: Path, cache: Path, *more: str) -> list[str]:
    # The trained run's data settings, so that its cached scan and manifest serve; a new
    # training, not a reuse of it.
    return [
        "train",
        "--data",
        str(colours),
        "--backbone",
        backbone,
        "--image-size",
        "32",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--test-fraction",
        "0.25",
        "--no-reuse",
        "--no-gate",
        "--artifacts-root",
        str(artifacts),
        "--cache-dir",
        str(cache),
        *more,
    ]


def test_a_full_disk_under_the_artifacts_root_is_one_line(
    prefect_harness, trained, colours, tiny_backbone_dir, tmp_path, capfd
):
    """A full disk under --artifacts-root: the run is not written, the registry's earlier runs and champion stay."""
    run, cache = trained
    shutil.copytree(cache, tmp_path / "cache")
    with tmpfs(tmp_path / "artifacts", "size=2m") as artifacts:
        shutil.copytree(run, artifacts / run.name)
        registry.promote(artifacts, run.name, "the earlier champion")
        fill(artifacts)
        before = snapshot(artifacts)
        code = main(_train(colours, str(tiny_backbone_dir), artifacts, tmp_path / "cache"))
        line = one_error_line(capfd, code)
        assert str(artifacts) in line and "no space left" in line and "free some space" in line
        assert snapshot(artifacts) == before
        assert leftovers(artifacts) == [] and leftovers(tmp_path / "cache") == []


# Where each variant's disk is full, and what it takes out of a complete cache so that the
# train writes it again: the LiteRT model (and the features, which would spare converting it),
# the feature shards, the bundled backbone's first conversion; or the whole cache, where the
# data's manifest is the first write.
CACHE_WRITES = {
    "litert write": ("litert", ("litert", "features", "datasets")),
    "shard write": ("features", ("features", "datasets")),
    "backbone conversion": ("backbones", ()),
    "manifest write": (".", ()),
}


@pytest.mark.parametrize("write", CACHE_WRITES)
def test_a_full_disk_under_the_cache_dir_is_one_line(
    write, prefect_harness, trained, colours, tiny_backbone_dir, tmp_path, capfd
):
    """A full disk under --cache-dir (LiteRT write, shard write, backbone conversion): nothing half-cached or lost."""
    run, cache = trained
    backbone = "bundled:mobilenet_v2" if write == "backbone conversion" else str(tiny_backbone_dir)
    full, removed = CACHE_WRITES[write]
    place = tmp_path / "cache"
    shutil.copytree(cache, place)
    for folder in removed:
        shutil.rmtree(place / folder)
    with tmpfs(place / full, "size=4m") as disk:
        if full == ".":
            shutil.copytree(cache, disk, dirs_exist_ok=True)
        fill(disk)
        before = snapshot(place)
        code = main(_train(colours, backbone, tmp_path / "artifacts", place))
        line = one_error_line(capfd, code)
        assert str(disk) in line and "no space left" in line and "free some space" in line
        assert snapshot(place) == before
        assert leftovers(place) == []
        assert not (tmp_path / "artifacts").exists() or list((tmp_path / "artifacts").iterdir()) == []


def test_a_full_disk_under_the_registry_on_promote_is_one_line(trained, tmp_path, capfd):
    """A full disk under the registry (`models promote`): the champion stays the one it was."""
    run, _ = trained
    with tmpfs(tmp_path / "artifacts", "size=2m") as artifacts:
        shutil.copytree(run, artifacts / run.name)
        shutil.copytree(run, artifacts / "another")
        registry.promote(artifacts, run.name, "the earlier champion")
        fill(artifacts)
        before = snapshot(artifacts)
        line = one_error_line(capfd, main(["models", "--artifacts-root", str(artifacts), "promote", "another"]))
        assert str(artifacts) in line and "no space left" in line
        assert registry.champion_version(artifacts) == run.name
        assert snapshot(artifacts) == before and leftovers(artifacts) == []


def test_a_full_disk_under_the_predict_output_is_one_line(trained, colours, tmp_path, capfd):
    """A full disk under `predict --output`: no file and no temporary file is left there."""
    run, cache = trained
    with tmpfs(tmp_path / "out", "size=64k") as out:
        fill(out)
        command = ["predict", "--model", str(run), str(colours / "red"), "--cache-dir", str(cache)]
        line = one_error_line(capfd, main([*command, "--output", str(out / "predictions.csv")]))
        assert str(out / "predictions.csv") in line and "no space left" in line
        assert sorted(path.name for path in out.iterdir()) == ["filler"]


def _place(kind: str, where: Path) -> contextlib.AbstractContextManager[Path]:
    """A read-only folder (a read-only mount: root ignores permission bits), or a file."""
    if kind == "read-only":
        return tmpfs(where, "ro")
    where.write_text("a file, not a folder\n")
    return contextlib.nullcontext(where)


@pytest.mark.parametrize("kind", ["read-only", "not a directory"])
@pytest.mark.parametrize("option", ["--artifacts-root", "--cache-dir", "--output"])
def test_a_read_only_or_non_directory_place_is_refused_before_any_work(
    option, kind, trained, colours, tiny_backbone_dir, tmp_path, capfd
):
    """A read-only or non-directory --artifacts-root / --cache-dir / --output: refused before any work."""
    run, cache = trained
    places = {"--artifacts-root": tmp_path / "artifacts", "--cache-dir": tmp_path / "cache"}
    with _place(kind, tmp_path / "place") as place:
        if option == "--output":
            command = ["predict", "--model", str(run), str(colours / "red"), "--cache-dir", str(cache)]
            code = main([*command, "--output", str(place / "predictions.csv")])
        else:
            places[option] = place / "sub"
            code = main(_train(colours, str(tiny_backbone_dir), places["--artifacts-root"], places["--cache-dir"]))
        line = one_error_line(capfd, code)
        assert f"{option} {place}" in line
        assert ("read-only" in line) if kind == "read-only" else ("not a folder" in line)
    # Nothing was scanned or written: neither place was even created.
    assert not any(path.exists() for name, path in places.items() if name != option)


def test_a_deployment_run_checks_its_places_at_the_flow_start(prefect_harness, colours, tiny_backbone_dir, tmp_path):
    """A non-directory artifacts root given to the flow itself (a deployment run): refused before the scan."""
    from flows.train import train

    (tmp_path / "artifacts").write_text("a file\n")
    config = smoke_config(
        colours,
        tiny_backbone_dir,
        tmp_path,
    )
    with pytest.raises(HeadstartError, match="not a folder"):
        train(**config.flat())
    assert not (tmp_path / "cache").exists()


BAD_OPTIONS = {
    "--seed above 2**32-1": (["train", "--seed", str(2**32)], "--seed"),
    "--seed below 0": (["train", "--seed", "-1"], "--seed"),
    "train --threads -1": (["train", "--threads", "-1"], "--threads"),
    'train --data ""': (["train", "--data", ""], "--data"),
    "predict --batch-size 0": (["predict", "--batch-size", "0"], "--batch-size"),
    "predict --batch-size -1": (["predict", "--batch-size", "-1"], "--batch-size"),
    "predict --threads -1": (["predict", "--threads", "-1"], "--threads"),
    "evaluate --batch-size -1": (["evaluate", "--batch-size", "-1"], "--batch-size"),
    'evaluate --data " "': (["evaluate", "--data", " "], "--data"),
    'evaluate --model ""': (["evaluate", "--model", ""], "--model"),
}


@pytest.mark.parametrize("attack", BAD_OPTIONS)
def test_an_option_out_of_range_is_refused_before_any_work(attack, trained, colours, tmp_path, capfd):
    """--seed outside 0…2**32−1, --batch-size 0 or -1, --threads -1, --data "": one line naming the option."""
    run, _ = trained
    given, option = BAD_OPTIONS[attack]
    command, places = given[0], ["--artifacts-root", str(tmp_path / "artifacts"), "--cache-dir", str(tmp_path / "c")]
    base = {
        "train": ["--data", str(colours), *places],
        "predict": ["--model", str(run), str(colours / "red"), *places],
        "evaluate": ["--model", str(run), "--data", str(colours)],
    }[command]
    # The option given last wins: `--data ""` replaces the base's folder.
    line = one_error_line(capfd, main([command, *base, *given[1:]]))
    assert line.startswith(f"headstart: error: {option}:")
    assert not (tmp_path / "artifacts").exists() and not (tmp_path / "c").exists()


def test_predict_with_an_empty_input_path_is_refused_before_any_work(trained, colours, tmp_path, capfd):
    """`predict ""`: an empty path is the working directory, whose images nobody asked to label: one line."""
    run, cache = trained
    code = main(["predict", str(colours / "red"), "", "--model", str(run), "--cache-dir", str(tmp_path / "c")])
    line = one_error_line(capfd, code)
    assert "empty path" in line and not (tmp_path / "c").exists()


def test_predict_on_an_empty_folder_says_why(trained, tmp_path, capfd):
    """`predict` on an empty folder: one line saying there is no image, naming the folder."""
    run, cache = trained
    (tmp_path / "empty").mkdir()
    output = tmp_path / "predictions.csv"
    command = ["predict", "--model", str(run), str(tmp_path / "empty"), "--cache-dir", str(cache)]
    line = one_error_line(capfd, main([*command, "--output", str(output)]))
    assert str(tmp_path / "empty") in line and "no image" in line
    assert not output.exists()


@pytest.mark.parametrize("character", ["\t", "\n"], ids=["tab", "newline"])
def test_a_class_name_with_a_tab_or_newline_is_refused_at_scan_time(
    character, prefect_harness, tiny_backbone_dir, tmp_path, capfd
):
    """Class names with a tab or newline (predict's TSV would be ambiguous): refused at scan time, in one line."""
    data = write_class_images(
        tmp_path / "data", {f"red{character}ish": (200, 40, 40), "blue": (40, 40, 200)}, per_class=4
    )
    code = main(_train(data, str(tiny_backbone_dir), tmp_path / "artifacts", tmp_path / "cache"))
    line = one_error_line(capfd, code)
    assert repr(str(data / f"red{character}ish")) in line and "rename the folder" in line
    assert not (tmp_path / "cache" / "features").exists()


@pytest.mark.parametrize("holds_the_model", [False, True], ids=["empty", "holding the LiteRT model"])
def test_predict_with_a_read_only_cache_dir_is_one_line_or_serves(holds_the_model, trained, colours, tmp_path, capfd):
    """A read-only --cache-dir for predict: one line where it must write there, served where it holds all it needs."""
    run, cache = trained
    with tmpfs(tmp_path / "cache", "size=4m") as place:
        if holds_the_model:
            shutil.copytree(cache, place, dirs_exist_ok=True)
        subprocess.run(["mount", "-o", "remount,ro", str(place)], check=True)
        code = main(["predict", "--model", str(run), str(colours / "red"), "--cache-dir", str(place)])
        if holds_the_model:
            captured = capfd.readouterr()
            assert code == 0 and "headstart: error:" not in captured.err and len(captured.out.splitlines()) == 16
        else:
            line = one_error_line(capfd, code)
            assert str(place) in line and "read-only" in line and "choose a writable place" in line


@pytest.mark.parametrize(
    "error",
    [OSError(errno.ENOENT, "No such file or directory", "/gone"), ZeroDivisionError("a bug")],
    ids=["a missing file headstart should have made", "a plain bug"],
)
def test_a_genuine_bug_keeps_its_traceback(error, trained, colours, monkeypatch):
    """A genuine bug (not a file-system fault a user can fix) still escapes main with its traceback."""

    def fails(*args, **kwargs):
        raise error

    monkeypatch.setattr("headstart.serving.inference.evaluate_folder", fails)
    with pytest.raises(type(error)):
        main(["evaluate", "--model", str(trained[0]), "--data", str(colours)])


@pytest.mark.parametrize(
    "code, says",
    [
        (errno.ENOSPC, "no space left"),
        (errno.EDQUOT, "quota exceeded"),
        (errno.EROFS, "read-only"),
        (errno.ENOTDIR, "a file stands where a folder is needed"),
        (errno.EISDIR, "a folder stands where a file is needed"),
        (errno.EACCES, "permission denied"),
        (errno.EPERM, "not permitted"),
    ],
)
def test_every_anticipated_file_system_fault_names_its_path_and_what_to_do(code, says):
    """Each file-system fault a user can put right (no space, quota, read-only, not a directory, is a directory,
    permission) is one line naming the path, never a temporary file's name."""
    fault = file_system_fault(OSError(code, os.strerror(code), "/data/artifacts/.20260101-x.partial/model.keras"))
    assert str(fault).startswith("/data/artifacts: ") and says in str(fault) and "; " in str(fault)
    assert "\n" not in str(fault)


def test_a_deployment_predict_checks_its_output_before_predicting(trained, colours, tmp_path):
    """A read-only `--output` given to the predict flow itself (a deployment run): refused before any image is read."""
    from flows.predict import predict

    run, cache = trained
    with tmpfs(tmp_path / "out", "ro") as out:
        with pytest.raises(HeadstartError, match="read-only") as refused:
            predict(inputs=(str(colours / "red"),), model=str(run), cache_dir=cache, output=out / "predictions.csv")
    assert f"--output {out}" in str(refused.value)


def test_a_full_disk_inside_the_flow_is_never_taken_for_a_lost_prefect_server(
    trained, colours, tiny_backbone_dir, tmp_path, capfd, monkeypatch
):
    """A full disk met inside the flow: the one line names the disk, and the Prefect API is not even asked."""
    import flows.local_server

    def api_problem():  # the server answers before the work; asked after it, it would say it is gone
        return "not answering" if (tmp_path / "cache" / "manifests").exists() else None

    monkeypatch.setattr(flows.local_server, "api_problem", api_problem)
    with tmpfs(tmp_path / "cache" / "features", "size=64k") as features:
        fill(features)
        code = main(_train(colours, str(tiny_backbone_dir), tmp_path / "artifacts", tmp_path / "cache"))
        line = one_error_line(capfd, code)
    assert str(features) in line and "no space" in line


def test_a_disk_that_fills_while_the_run_s_backbone_is_copied_is_one_line(
    trained, colours, tiny_backbone_dir, tmp_path, capfd
):
    """A full disk under --artifacts-root met while the run's backbone is copied in (a copied tree reports its
    failures together, each errno only in its text): one line naming the place, no staging run left."""
    run, cache = trained
    shutil.copytree(cache, tmp_path / "cache")
    # Room for the check and the run's first small files, not for the backbone.
    with tmpfs(tmp_path / "artifacts", "size=16k") as artifacts:
        code = main(_train(colours, str(tiny_backbone_dir), artifacts, tmp_path / "cache"))
        line = one_error_line(capfd, code)
        assert str(artifacts) in line and "no space left" in line
        assert [path for path in artifacts.rglob("*") if path.is_file()] == [] and leftovers(artifacts) == []
    copied = shutil.Error([("src/a", "dst/a", "[Errno 28] No space left on device: 'src/a' -> 'dst/a'")])
    assert "dst/a: no space left" in str(file_system_fault(copied))
    assert file_system_fault(shutil.Error([("src/a", "dst/a", "[Errno 2] No such file")])) is None
