"""When the ledger cannot commit (disk full, database locked), nothing is acknowledged,
the gateway retries with back-off and says so, and nothing is lost once it recovers."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import LedgerError
from gateway.ledger import LedgerWrite
from gateway.sqlite_ledger import SqliteLedger
from tests.helpers import Listener, RawDevice, running_gateway


class FailingLedger(SqliteLedger):
    """A real SQLite ledger whose commits fail while ``failing`` is set."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.failing = False
        self.failed = asyncio.Event()

    async def commit(self, write: LedgerWrite) -> None:
        if self.failing:
            self.failed.set()
            raise LedgerError("database or disk is full")
        await super().commit(write)


async def test_failed_commits_are_retried_and_nothing_is_lost(broker: Any, tmp_path: Path) -> None:
    ledger = FailingLedger(tmp_path / "ledger.sqlite3")
    async with running_gateway(broker.url, tmp_path, ledger=ledger) as gw:
        device = RawDevice("disk-1")
        await gw.add_device(device.id, device.key, 1000)
        ledger.failing = True
        async with Listener.connect(broker.url) as publisher:
            publisher.publish(gw.topics.usage(device.id), device.report({"api_calls": 4200}))
            await asyncio.wait_for(ledger.failed.wait(), 10)
        health = await gw.api.get("/healthz")
        assert (health.status_code, health.json()["status"]) == (503, "ledger_failing")
        assert (await gw.device(device.id))["used"] == 0
        ledger.failing = False
        await gw.wait_committed(lambda: gw.service.registry.devices[device.id].used == 42)
        assert (await gw.api.get("/healthz")).status_code == 200
        assert "tokenwell_commit_failures_total" in (await gw.api.get("/metrics")).text


async def test_a_gateway_stopped_while_commits_fail_leaves_the_report_with_the_broker(
    broker: Any, tmp_path: Path
) -> None:
    """Stopped mid-failure, it exits with an error and acknowledges nothing; the next run
    receives the report again from its persistent session and charges it once."""
    device = RawDevice("disk-2")
    ledger = FailingLedger(tmp_path / "ledger.sqlite3")

    async def run_while_commits_fail() -> None:
        async with running_gateway(
            broker.url, tmp_path, ledger=ledger, client_id="disk-gw", prefix="disk/v1"
        ) as gw:
            await gw.add_device(device.id, device.key, 1000)
            ledger.failing = True
            async with Listener.connect(broker.url) as publisher:
                publisher.publish(gw.topics.usage(device.id), device.report({"api_calls": 700}))
                await asyncio.wait_for(ledger.failed.wait(), 10)

    with pytest.raises(ExceptionGroup) as stopped:
        await run_while_commits_fail()
    assert stopped.group_contains(LedgerError)
    async with running_gateway(broker.url, tmp_path, client_id="disk-gw", prefix="disk/v1") as gw:
        await gw.wait_committed(lambda: gw.service.registry.devices[device.id].used == 7)
