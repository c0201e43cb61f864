"""The simulator's state file: round trip, atomic replacement, clear errors."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import pytest

from device_sim.device import SimDevice, make_devices
from device_sim.store import StateFileError, load_fleet, merge_fleet, save_fleet


def states(devices: Iterable[SimDevice]) -> list[dict[str, object]]:
    return [device.to_dict() for device in devices]


def test_a_missing_file_is_an_empty_fleet(tmp_path: Path) -> None:
    assert load_fleet(tmp_path / "absent.json") == []


def test_saved_devices_continue_their_counts(tmp_path: Path) -> None:
    """Keys, counters, boot epoch and report number survive a save and a load."""
    path = tmp_path / "fleet.json"
    devices = make_devices(3, seed=5)
    devices[0].advance(2.5)
    devices[0].report(1)
    devices[1].factory_reset()
    save_fleet(path, devices)
    loaded = load_fleet(path)
    assert states(loaded) == states(devices)
    assert (loaded[0].number, loaded[1].boot) == (1, 1)


def test_saving_replaces_the_file_and_leaves_no_temporary_behind(tmp_path: Path) -> None:
    path = tmp_path / "fleet.json"
    save_fleet(path, make_devices(2))
    save_fleet(path, make_devices(1))
    assert len(load_fleet(path)) == 1
    assert os.listdir(tmp_path) == ["fleet.json"]


def test_a_failed_save_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If the rename fails, the previous state is intact and the temporary file is gone."""
    path = tmp_path / "fleet.json"
    save_fleet(path, make_devices(2))

    def refuse(src: object, dst: object) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(StateFileError, match="disk on fire"):
        save_fleet(path, make_devices(5))
    monkeypatch.undo()
    assert len(load_fleet(path)) == 2
    assert os.listdir(tmp_path) == ["fleet.json"]


def test_an_unwritable_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StateFileError, match="cannot write"):
        save_fleet(tmp_path / "no" / "such" / "folder.json", make_devices(1))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not JSON"),
        ("[]", "not a simulator state file"),
        ('{"format": "tokenwell-sim", "version": 99, "devices": []}', "unsupported version"),
        ('{"format": "tokenwell-sim", "version": 1, "devices": [{"id": "x"}]}', "device #0"),
    ],
)
def test_a_damaged_file_is_a_clear_error(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "fleet.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(StateFileError, match=message):
        load_fleet(path)


def test_a_device_listed_twice_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "fleet.json"
    twice = states(make_devices(1)) * 2
    path.write_text(json.dumps({"format": "tokenwell-sim", "version": 1, "devices": twice}))
    with pytest.raises(StateFileError, match="twice"):
        load_fleet(path)


def test_merge_keeps_every_saved_device_and_adds_new_ones() -> None:
    """Saved state wins over a fresh device of the same id; no saved device is dropped."""
    saved = make_devices(3, seed=1)
    saved[1].factory_reset()
    merged = merge_fleet(saved[:2], make_devices(1, seed=9) + make_devices(4, seed=1)[2:])
    assert [d.device_id for d in merged] == ["sim-0000", "sim-0001", "sim-0002", "sim-0003"]
    assert merged[0] is saved[0]
    assert merged[1].boot == 1
