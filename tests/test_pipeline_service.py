"""The pipeline in a real gateway: a batch is charged while the one before it commits,
on top of that batch's uncommitted effects; nothing becomes visible before its own
commit; an admin operation waits for every batch already charged to commit, so it is
neither lost nor overwritten."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from pathlib import Path
from typing import Any

import pytest

from gateway.ledger import LedgerWrite, UsageQuery
from gateway.metrics import STAGES
from gateway.runtime import LOOP_BOOST
from gateway.sqlite_ledger import SqliteLedger
from gateway.writer import PRIORITY_BOOST
from tests.helpers import (
    Listener,
    RawDevice,
    assert_conserved,
    may_raise_priority,
    running_gateway,
)


class HeldLedger(SqliteLedger):
    """A real SQLite ledger whose commits of debits wait while ``gate`` is closed."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.gate = asyncio.Event()
        self.gate.set()
        self.holding = asyncio.Event()

    async def commit(self, write: LedgerWrite) -> None:
        if write.debits and not self.gate.is_set():
            self.holding.set()
            await self.gate.wait()
        await super().commit(write)


async def test_a_batch_charged_while_the_previous_commits_builds_on_it(
    broker: Any, tmp_path: Path
) -> None:
    ledger = HeldLedger(tmp_path / "ledger.sqlite3")
    async with running_gateway(broker.url, tmp_path, ledger=ledger) as gw:
        device = RawDevice("pipe-1")
        await gw.add_device(device.id, device.key, 1000)
        ledger.gate.clear()
        async with Listener.connect(broker.url) as publisher:
            publisher.publish(gw.topics.usage(device.id), device.report({"api_calls": 4200}))
            await asyncio.wait_for(ledger.holding.wait(), 10)  # batch 1 is committing
            publisher.publish(gw.topics.usage(device.id), device.report({"api_calls": 5000}))
            charged = gw.service.charged
            async with asyncio.timeout(10), charged:  # batch 2 is charged on top of batch 1
                await charged.wait_for(lambda: gw.service._staged.batches == 2)
            assert (await gw.device(device.id))["used"] == 0  # nothing visible yet
            refill = asyncio.create_task(gw.service.refill(device.id, 100, "pipe-refill"))
            for _ in range(100):  # let the loop run: the refill must be waiting
                await asyncio.sleep(0)
            assert not refill.done()  # waits for both batches to commit
            ledger.gate.set()
            await asyncio.wait_for(refill, 10)
        state = await gw.device(device.id)
        assert (state["used"], state["balance"]) == (50, 1000 + 100 - 50)
        rows = await gw.service.ledger.usage(UsageQuery(device=device.id))
        assert [(row.units, row.tokens) for row in rows] == [(5000, 50)]
        await assert_conserved(gw.service.ledger)
    reopened = SqliteLedger(tmp_path / "ledger.sqlite3")
    await reopened.open()
    try:
        snapshot = await assert_conserved(reopened)
        assert [d.used for d in snapshot.devices] == [50]
        assert [(h.meter, h.high) for h in snapshot.highs] == [("api_calls", 5000)]
    finally:
        await reopened.close()


@pytest.mark.skipif(
    not may_raise_priority(LOOP_BOOST + PRIORITY_BOOST), reason="not allowed to raise a priority"
)
async def test_the_event_loop_runs_above_the_receiver_and_the_writer_above_both(
    broker: Any, tmp_path: Path
) -> None:
    """The serial stages first (gateway.runtime): the event loop ``LOOP_BOOST`` nice levels
    above the priority the gateway was started with, the writer ``PRIORITY_BOOST`` above
    the loop; the receiver, a replaced one too, at the priority the gateway started with;
    the loop back there once the gateway has stopped."""
    started = os.getpriority(os.PRIO_PROCESS, 0)
    device = RawDevice("nice-1")
    async with running_gateway(broker.url, tmp_path) as gw:
        receiver, writer = gw.gateway.receiver, gw.service.ledger.writer.pid
        assert receiver is not None
        assert receiver.pid is not None
        assert writer is not None
        assert os.getpriority(os.PRIO_PROCESS, 0) == started - LOOP_BOOST
        assert os.getpriority(os.PRIO_PROCESS, writer) == started - LOOP_BOOST - PRIORITY_BOOST
        assert os.getpriority(os.PRIO_PROCESS, receiver.pid) == started
        await gw.add_device(device.id, device.key, 1_000)
        first = receiver.pid
        os.kill(first, signal.SIGKILL)
        async with Listener.connect(broker.url) as publisher:
            publisher.publish(gw.topics.usage(device.id), device.report({"api_calls": 100}))
            await gw.wait_committed(
                lambda: gw.service.registry.devices[device.id].used == 1, timeout=30
            )
        assert receiver.pid not in (None, first)
        assert os.getpriority(os.PRIO_PROCESS, receiver.pid) == started
    assert os.getpriority(os.PRIO_PROCESS, 0) == started


async def test_metrics_time_every_stage_a_report_went_through(broker: Any, tmp_path: Path) -> None:
    """``/metrics`` (over HTTP) has a ``tokenwell_stage_seconds`` observation for each
    stage once a report is committed: verify, charge, queued and publish, once each for
    one report alone in its batch and commit."""
    device = RawDevice("staged-1")
    async with running_gateway(broker.url, tmp_path) as gw:
        await gw.add_device(device.id, device.key, 1_000)
        async with Listener.connect(broker.url) as publisher:
            publisher.publish(gw.topics.usage(device.id), device.report({"api_calls": 100}))
            await gw.wait_committed(lambda: gw.service.registry.devices[device.id].used == 1)
        text = (await gw.api.get("/metrics")).text
    counts = dict(re.findall(r'^tokenwell_stage_seconds_count\{stage="(\w+)"\} (\S+)$', text, re.M))
    assert {stage: float(n) for stage, n in counts.items()} == dict.fromkeys(STAGES, 1.0)
    sums = dict(re.findall(r'^tokenwell_stage_seconds_sum\{stage="(\w+)"\} (\S+)$', text, re.M))
    assert all(float(sums[stage]) > 0 for stage in STAGES)
