"""Persistence of a simulated fleet: one JSON file, replaced atomically.

The file holds every device's state (key, rates, counters, boot epoch, report number, last
control message applied), so a restarted simulator continues its counts instead of
counting again from zero under a boot epoch the gateway has already charged.

Writes are atomic: the new content goes to a temporary file in the same folder, is
fsync'ed, then ``os.replace``s the old file, and the folder is fsync'ed. A crash leaves
either the old file or the new one, never half of one.

File shape::

    {"format": "tokenwell-sim", "version": 1, "devices": [SimDevice.to_dict(), ...]}
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final

from device_sim.device import SimDevice
from gateway.errors import TokenwellError

FORMAT: Final = "tokenwell-sim"
VERSION: Final = 1


class StateFileError(TokenwellError):
    """The simulator's state file cannot be read, parsed or written."""


def load_fleet(path: Path) -> list[SimDevice]:
    """The devices saved at ``path``; ``[]`` when there is no such file.

    Raises :class:`StateFileError` when the file cannot be read or is not a saved fleet.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise StateFileError(f"cannot read state file {path}: {exc}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise StateFileError(f"state file {path} is not JSON: {exc}") from None
    return _devices(path, data)


def _devices(path: Path, data: object) -> list[SimDevice]:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise StateFileError(f"{path} is not a simulator state file")
    if data.get("version") != VERSION or not isinstance(data.get("devices"), list):
        raise StateFileError(f"state file {path}: unsupported version {data.get('version')!r}")
    devices = []
    for index, entry in enumerate(data["devices"]):
        try:
            devices.append(SimDevice.from_dict(entry))
        except ValueError as exc:
            raise StateFileError(f"state file {path}, device #{index}: {exc}") from None
    if len({device.device_id for device in devices}) != len(devices):
        raise StateFileError(f"state file {path} lists a device twice")
    return devices


def save_fleet(path: Path, devices: Iterable[SimDevice]) -> None:
    """Replace ``path`` atomically with the state of ``devices``.

    Raises :class:`StateFileError` when it cannot be written; the old file is then intact.
    """
    document = {"format": FORMAT, "version": VERSION, "devices": [d.to_dict() for d in devices]}
    text = json.dumps(document, indent=1, sort_keys=True) + "\n"
    try:
        _write_atomically(path, text.encode("utf-8"))
    except OSError as exc:
        raise StateFileError(f"cannot write state file {path}: {exc}") from None


def _write_atomically(path: Path, data: bytes) -> None:
    folder = path.parent
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _fsync_folder(folder)


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def merge_fleet(saved: Sequence[SimDevice], fresh: Sequence[SimDevice]) -> list[SimDevice]:
    """Every saved device (they continue where they stopped), then the ``fresh`` ones whose
    id is not saved: a state file never loses a device, whatever ``--devices`` says.
    """
    known = {device.device_id for device in saved}
    return [*saved, *(device for device in fresh if device.device_id not in known)]
