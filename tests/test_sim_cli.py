"""``tokenwell sim``: runs against a broker, keeps state, fails with one clear line."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_sim.cli import main
from device_sim.store import load_fleet
from gateway.wire import public_key_hex

GATEWAY_HEX = public_key_hex(Ed25519PrivateKey.from_private_bytes(bytes(32)))


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    return lines[0]


def test_runs_for_its_duration_and_a_restart_continues_the_counts(
    broker: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "fleet.json"
    args = ["--devices", "2", "--broker", broker.url, "--prefix", "test/cli", "--state",
            str(state), "--interval", "0.05", "--duration", "0.2", "--gateway-key", GATEWAY_HEX,
            "--duplicate", "0.5", "--malformed", "0.5"]  # fmt: skip
    assert main(args) == 0
    first = {device.device_id: device.number for device in load_fleet(state)}
    assert len(first) == 2
    assert all(number >= 2 for number in first.values())  # the connect report, then ticks
    assert "2 devices: " in capsys.readouterr().out
    assert main(args) == 0
    again = {device.device_id: device.number for device in load_fleet(state)}
    assert all(again[device] > first[device] for device in first)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--devices", "2", "--gateway-key", "abcd"], "--gateway-key"),
        (["--devices", "2", "--broker", "http://x", "--gateway-key", GATEWAY_HEX], "broker URL"),
        (
            ["--devices", "2", "--id-prefix", "no spaces", "--gateway-key", GATEWAY_HEX],
            "--id-prefix",
        ),
        (["--devices", "1", "--gateway-key", GATEWAY_HEX, "--provision"], "--provision needs"),
    ],
)
def test_bad_settings_fail_with_one_line(
    args: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TOKENWELL_API", raising=False)
    assert main(args) == 1
    assert message in one_error_line(capsys)


@pytest.mark.parametrize("args", [["--devices", "0"], ["--devices", "1", "--forge", "2"], []])
def test_bad_arguments_exit_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 2
    assert "error:" in capsys.readouterr().err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "--impersonate" in capsys.readouterr().out


def test_an_unreachable_broker_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    broker = f"mqtt://127.0.0.1:{closed_port()}"
    args = [
        "--devices",
        "1",
        "--broker",
        broker,
        "--gateway-key",
        GATEWAY_HEX,
        "--connect-timeout",
        "0.5",
    ]
    assert main(args) == 1
    assert "unreachable" in one_error_line(capsys)


def test_an_unreachable_api_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    api = f"http://127.0.0.1:{closed_port()}"
    assert main(["--devices", "1", "--api", api, "--token", "t"]) == 1
    assert "admin API" in one_error_line(capsys)
