"""``tokenwell accounts``, ``pool`` and ``grant``, and ``devices add`` on a shared pool, run
as real processes against a real gateway."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.helpers import RawDevice, running_gateway
from tests.test_cli import run_cli


async def test_a_shared_pool_is_set_up_and_used_through_the_cli(
    shared_broker: Any, tmp_path: Path
) -> None:
    async with running_gateway(shared_broker.url, tmp_path) as gw:
        api = str(gw.api.base_url)
        created = await run_cli(
            "pool", "set", "--account", "acme", "--policy", "overage", "--overage-cap", "50",
            "--period", "month", "--anchor", "2026-11-01", "--period-tokens", "1000",
            "--threshold", "80%", "--topup-floor", "10", "--topup-tokens", "200", api=api,
        )  # fmt: skip
        assert created.returncode == 0, created.stderr
        assert "pool: shared (account acme), policy overage, overage cap 50" in created.stdout
        assert "every month from 2026-11-01T00:00:00.000Z: 1000 tokens" in created.stdout
        assert "alerts at 80% used" in created.stdout
        pool = gw.service.registry.pools["@acme"]
        assert (pool.policy, pool.overage_cap, pool.topup.tokens) == ("overage", 50, 200)

        changed = await run_cli("pool", "set", "--account", "acme", "--threshold", "50%",
                                api=api)  # fmt: skip
        assert changed.returncode == 0, changed.stderr
        pool = gw.service.registry.pools["@acme"]  # only the thresholds changed
        assert (pool.policy, pool.overage_cap, pool.period is not None) == ("overage", 50, True)
        assert [str(t) for t in pool.thresholds] == ["1/2"]
        for cap in ("30", "0"):  # 0 is a value too, not "not given"
            rolled = await run_cli("pool", "set", "--account", "acme", "--rollover-cap", cap,
                                   api=api)  # fmt: skip
            assert rolled.returncode == 0, rolled.stderr
            assert f"rollover up to {cap};" in rolled.stdout

        grant = ("grant", "--account", "acme", "300", "--priority", "2", "--expires",
                 "2099-01-01", "--idempotency-key", "g")  # fmt: skip
        granted = await run_cli(*grant, api=api)
        assert granted.returncode == 0, granted.stderr
        assert "300 of 300 left, priority 2, 2099-01-01T00:00:00.000Z" in granted.stdout
        again = await run_cli(*grant, api=api)
        assert "already applied" in again.stdout

        device = RawDevice("cli-shared")
        key = device.key.public_key().public_bytes_raw().hex()
        added = await run_cli("devices", "add", device.id, "--public-key", key, "--tokens", "0",
                              "--account", "acme", "--shared", "--cap", "40", api=api)  # fmt: skip
        assert added.returncode == 0, added.stderr
        assert "pool: shared" in added.stdout
        assert "cap: 40" in added.stdout

        shown = await run_cli("accounts", "show", "acme", api=api)
        assert "devices: cli-shared" in shown.stdout
        assert "balance 300" in shown.stdout
        listed = await run_cli("accounts", "list", api=api)
        assert "acme: 1 devices, shared pool" in listed.stdout
        own = await run_cli("pool", "show", "--device", device.id, api=api)
        assert "pool: shared (account acme)" in own.stdout


async def test_economics_commands_fail_in_one_line(shared_broker: Any, tmp_path: Path) -> None:
    async with running_gateway(shared_broker.url, tmp_path) as gw:
        api = str(gw.api.base_url)
        for args in (
            ("pool", "show", "--account", "nobody"),
            ("grant", "--device", "nobody", "5"),
            ("pool", "set", "--device", "nobody", "--policy", "payg"),
            ("pool", "set", "--account", "a", "--period", "day"),
            ("pool", "set", "--account", "a", "--topup-floor", "3"),
            ("accounts", "show", "nobody"),
            ("grant", "5"),
        ):
            result = await run_cli(*args, api=api)
            assert result.returncode != 0, args
            assert len(result.stderr.strip().splitlines()) == 1, (args, result.stderr)
            assert "Traceback" not in result.stderr
        assert gw.service.registry.pools == {}
