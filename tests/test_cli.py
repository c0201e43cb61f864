"""The ``tokenwell`` command line, run as a real process against a real gateway."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.helpers import TOKEN, Listener, RawDevice, free_port, running_gateway


def tokenwell(*args: str, api: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "TOKENWELL_TOKEN": TOKEN, **env}
    if api:
        environ["TOKENWELL_API"] = api
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args], env=environ, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip


async def run_cli(*args: str, api: str | None = None) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(tokenwell, *args, api=api)


async def test_provision_refill_usage_and_revoke_through_the_cli(
    shared_broker: Any, tmp_path: Path
) -> None:
    async with running_gateway(shared_broker.url, tmp_path) as gw:
        api = str(gw.api.base_url)
        device = RawDevice("cli-1")
        key = device.key.public_key().public_bytes_raw().hex()
        added = await run_cli(
            "devices", "add", "cli-1", "--public-key", key, "--tokens", "500", api=api
        )
        assert added.returncode == 0, added.stderr
        assert "balance: 500" in added.stdout
        async with Listener.connect(shared_broker.url) as publisher:
            publisher.publish(gw.topics.usage("cli-1"), device.report({"api_calls": 12_345}))
            await gw.wait_committed(lambda: gw.service.registry.devices["cli-1"].used == 124)
        listed = await run_cli("devices", "list", api=api)
        assert "cli-1" in listed.stdout
        assert "376" in listed.stdout
        refill = await run_cli("refill", "cli-1", "100", "--idempotency-key", "k1", api=api)
        assert "allocation: 600" in refill.stdout
        again = await run_cli("refill", "cli-1", "100", "--idempotency-key", "k1", api=api)
        assert "already applied" in again.stdout
        assert "allocation: 600" in again.stdout
        usage = await run_cli("usage", "--device", "cli-1", "--bucket", "day", api=api)
        assert usage.returncode == 0
        assert "api_calls" in usage.stdout
        assert "12345" in usage.stdout
        assert "total tokens: 124" in usage.stdout
        key_line = await run_cli("gateway-key", api=api)
        assert key_line.stdout.strip() == (await gw.api.get("/v1/gateway")).json()["public_key"]
        shown = await run_cli("devices", "show", "cli-1", api=api)
        assert "used: 124" in shown.stdout
        revoked = await run_cli("devices", "revoke", "cli-1", api=api)
        assert "state: revoked" in revoked.stdout


async def test_refused_requests_are_one_line_without_traceback(
    shared_broker: Any, tmp_path: Path
) -> None:
    async with running_gateway(shared_broker.url, tmp_path) as gw:
        api = str(gw.api.base_url)
        missing = await run_cli("devices", "show", "nobody", api=api)
        assert missing.returncode == 1
        assert missing.stderr.strip().count("\n") == 0
        assert "not_found" in missing.stderr
        bad_key = await run_cli(
            "devices", "add", "x", "--public-key", "abc", "--tokens", "1", api=api
        )
        assert bad_key.returncode == 1
        assert "public_key" in bad_key.stderr
        assert "Traceback" not in bad_key.stderr


def test_unreachable_api_and_bad_arguments_are_one_clear_line() -> None:
    down = tokenwell("devices", "list", api=f"http://127.0.0.1:{free_port()}")
    assert down.returncode == 1
    assert down.stderr.startswith("tokenwell: cannot reach the admin API")
    assert down.stderr.count("\n") == 1
    wrong = tokenwell("refill", "dev", "lots")
    assert wrong.returncode == 2
    assert wrong.stderr.count("\n") == 1
    assert "invalid int" in wrong.stderr
    unknown = tokenwell("frobnicate")
    assert unknown.returncode == 2
    assert "Traceback" not in unknown.stderr


def test_gateway_with_a_bad_config_stops_at_start_up_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[meters]\napi_calls = "cheap"\n')
    result = tokenwell("gateway", "--config", str(config), "--db", str(tmp_path / "l.db"))
    assert result.returncode == 1
    assert "meters.api_calls" in result.stderr
    assert "Traceback" not in result.stderr
    config.write_text('colour = "blue"\n')
    result = tokenwell("gateway", "--config", str(config), "--db", str(tmp_path / "l.db"))
    assert result.returncode == 1
    assert "'colour'" in result.stderr


def test_every_command_has_help() -> None:
    for command in (["demo"], ["gateway"], ["devices", "add"], ["devices", "list"], ["refill"],
                    ["usage"], ["gateway-key"], ["watch"], ["sim"]):  # fmt: skip
        result = tokenwell(*command, "--help")
        assert result.returncode == 0, (command, result.stderr)
        assert "usage:" in result.stdout
