"""Looks at a data folder (headstart.data.changes): a fingerprint by content that an unchanged
folder gives without reading a file, the first look that records, the change reported once; the
`watch` flow that emits headstart.data.changed; `headstart data changed` without a server."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
from conftest import write_class_images

from headstart.data import changes
from headstart.data.changes import looking_at, state_path
from headstart.errors import HeadstartError

COLOURS = {"red": (200, 40, 40), "blue": (40, 40, 200)}


def _look(folder, cache):
    with looking_at(folder, cache) as change:
        return change


@pytest.fixture
def folder(tmp_path):
    return write_class_images(tmp_path / "data", COLOURS, per_class=6)


def test_the_first_look_records_and_an_unchanged_folder_is_looked_at_without_reading_a_file(
    folder, tmp_path, monkeypatch
):
    cache = tmp_path / "cache"
    first = _look(folder, cache)
    assert first.first_look and not first.changed and first.hashed == 12
    assert first.counts == {"blue": 6, "red": 6} and state_path(cache, folder).is_file()

    def never(*_):
        raise AssertionError("an unchanged folder was read")

    monkeypatch.setattr(changes, "file_sha256", never)
    monkeypatch.setattr(changes, "cached_scans", never)
    again = _look(folder, cache)
    assert not again.first_look and not again.changed and again.fingerprint == first.fingerprint
    assert "unchanged" in again.summary()


def test_a_folder_training_scanned_is_first_looked_at_from_the_scan_cache(folder, tmp_path, monkeypatch):
    from headstart.config import DataConfig
    from headstart.data.sources import prepare_source

    cache = tmp_path / "cache"
    prepare_source(DataConfig(data=str(folder)), cache)
    monkeypatch.setattr(changes, "file_sha256", lambda path: pytest.fail(f"{path} was read"))
    assert _look(folder, cache).hashed == 0


def test_added_removed_and_moved_images_change_the_fingerprint_touched_and_renamed_ones_do_not(folder, tmp_path):
    cache = tmp_path / "cache"
    first = _look(folder, cache)
    write_class_images(tmp_path / "more", COLOURS, per_class=2, seed=1)
    for name in COLOURS:
        for image in (tmp_path / "more" / name).iterdir():
            shutil.copy(image, folder / name / f"new-{image.name}")
    added = _look(folder, cache)
    assert added.changed and (added.added, added.removed) == (4, 0) and added.counts == {"blue": 8, "red": 8}
    assert added.previous == first.fingerprint and "4 images added" in added.summary()
    assert not _look(folder, cache).changed  # reported once

    image = folder / "red" / "000.png"
    os.utime(image, ns=(1, 1))
    image.rename(folder / "red" / "renamed.png")
    touched = _look(folder, cache)
    assert not touched.changed and touched.hashed == 1

    (folder / "red" / "renamed.png").rename(folder / "blue" / "moved.png")
    (folder / "blue" / "001.png").unlink()
    moved = _look(folder, cache)
    assert moved.changed and (moved.added, moved.removed) == (1, 2)


def test_a_look_whose_caller_failed_records_nothing_so_the_change_is_found_again(folder, tmp_path):
    cache = tmp_path / "cache"
    _look(folder, cache)
    (folder / "red" / "000.png").unlink()
    with pytest.raises(RuntimeError), looking_at(folder, cache) as change:
        assert change.changed
        raise RuntimeError("the event could not be sent")
    assert _look(folder, cache).changed


def test_a_damaged_record_is_dropped_with_a_warning_and_the_look_starts_afresh(folder, tmp_path, caplog):
    cache = tmp_path / "cache"
    _look(folder, cache)
    state_path(cache, folder).write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="headstart"):
        change = _look(folder, cache)
    assert change.first_look and "is damaged" in caplog.text
    assert json.loads(state_path(cache, folder).read_text())["fingerprint"] == change.fingerprint


def test_a_missing_folder_is_one_line(tmp_path):
    with pytest.raises(HeadstartError, match="data folder not found: .*nowhere"):
        _look(tmp_path / "nowhere", tmp_path / "cache")


def test_the_watch_flow_emits_the_event_only_when_the_folder_changed(folder, tmp_path, monkeypatch, prefect_harness):
    import tasks.watch
    from flows.watch import watch

    sent = []
    monkeypatch.setattr(tasks.watch, "emit_event", lambda **event: sent.append(event) or event)
    cache = tmp_path / "cache"
    for _ in range(2):
        state = watch(data=str(folder), cache_dir=cache, return_state=True)
        assert state.is_completed() and sent == []
    assert "unchanged since the last look" in state.message
    (folder / "blue" / "000.png").unlink()
    state = watch(data=str(folder), cache_dir=cache, return_state=True)
    assert "1 removed" in state.message and "emitted" in state.message
    (event,) = sent
    assert event["event"] == "headstart.data.changed"
    assert event["resource"]["prefect.resource.id"] == f"headstart.data.{folder}"
    assert event["resource"]["headstart.data.path"] == str(folder)
    assert (event["payload"]["counts"], event["payload"]["removed"]) == ({"blue": 5, "red": 6}, 1)

    # An event Prefect did not send leaves the look unrecorded: the next one reports the change.
    (folder / "red" / "000.png").unlink()
    monkeypatch.setattr(tasks.watch, "emit_event", lambda **event: None)
    state = watch(data=str(folder), cache_dir=cache, return_state=True)
    assert state.is_failed() and "did not send the event headstart.data.changed" in state.message
    monkeypatch.setattr(tasks.watch, "emit_event", lambda **event: sent.append(event) or event)
    assert "1 removed" in watch(data=str(folder), cache_dir=cache, return_state=True).message and len(sent) == 2


def test_headstart_data_changed_without_a_server_is_one_line_and_records_nothing(folder, tmp_path, capsys):
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from servers import free_port

    from flows.cli import main

    with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{free_port()}/api"}):
        assert main(["data", "changed", str(folder), "--cache-dir", str(tmp_path / "cache")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("headstart: error: the Prefect server at ") and error.count("\n") == 1
    assert "nothing was emitted" in error and not state_path(tmp_path / "cache", folder).exists()
