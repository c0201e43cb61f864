"""The ledger's writer process (gateway.writer): every transaction runs there, once.

It can die at any moment (killed, out of memory): with no transaction in hand, the next
commit starts another; with one in hand, the ledger looks up the transaction's marker to
tell a rolled-back transaction (raised, for the caller to retry) from a committed one
whose answer was lost (success: never committed twice)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import signal
import sys
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import LedgerError, WriterLost
from gateway.ledger import LedgerWrite
from gateway.sqlite_ledger import SqliteLedger
from gateway.writer import PRIORITY_BOOST, SEND_BYTES, Statement, WriterProcess
from tests.helpers import (
    Listener,
    RawDevice,
    assert_conserved,
    may_raise_priority,
    running_gateway,
)
from tests.test_ledger_contract import ROOT, T0, debit, device


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[SqliteLedger]:
    opened = SqliteLedger(tmp_path / "ledger.sqlite3")
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


async def kill_writer(ledger: SqliteLedger) -> None:
    pid = ledger.writer.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    process = ledger.writer._process
    assert process is not None
    await process.wait()


async def test_every_transaction_runs_in_the_writer_process(ledger: SqliteLedger) -> None:
    await ledger.commit(
        LedgerWrite(devices=[device("a")], debits=[debit("a", "api_calls", 0, 10, 3, T0)])
    )
    assert ledger.writer.pid not in (None, os.getpid())
    assert ledger.writer.started == 1
    assert [d.id for d in (await ledger.load()).devices] == ["a"]
    assert await ledger.totals("a") == (0, 3)


async def test_a_writer_killed_between_transactions_is_replaced(ledger: SqliteLedger) -> None:
    await ledger.commit(
        LedgerWrite(devices=[device("a")], debits=[debit("a", "api_calls", 0, 10, 3, T0)])
    )
    await kill_writer(ledger)
    await ledger.commit(LedgerWrite(debits=[debit("a", "api_calls", 10, 20, 4, T0)]))
    assert ledger.writer.started == 2
    assert await ledger.totals("a") == (0, 7)


class LosingWriter(WriterProcess):
    """A writer process that dies with the next transactions, as ``fates`` say: "before"
    its COMMIT (the transaction never reaches the process), or "after" it, the answer
    lost with the process."""

    fates: list[str] = []

    async def transaction(self, statements: Iterable[Statement]) -> None:
        fate = self.fates.pop(0) if self.fates else ""
        if fate == "before":
            raise WriterLost("killed before its COMMIT")
        await super().transaction(statements)
        if fate == "after":
            pid = self.pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            raise WriterLost("killed after its COMMIT, before its answer")


@pytest.fixture
async def losing(tmp_path: Path) -> AsyncIterator[tuple[SqliteLedger, LosingWriter]]:
    ledger = SqliteLedger(tmp_path / "ledger.sqlite3")
    writer = ledger.writer = LosingWriter(tmp_path / "ledger.sqlite3", 5000)
    await ledger.open()
    try:
        await ledger.commit(
            LedgerWrite(devices=[device("a")], debits=[debit("a", "api_calls", 0, 10, 3, T0)])
        )
        yield ledger, writer
    finally:
        await ledger.close()


async def test_a_writer_lost_after_its_commit_commits_nothing_twice(
    losing: tuple[SqliteLedger, LosingWriter],
) -> None:
    """The marker says it committed: success, not a retry that would debit twice; the
    next transaction finds the process dead and runs in a new one."""
    ledger, writer = losing
    writer.fates = ["after"]
    await ledger.commit(LedgerWrite(debits=[debit("a", "api_calls", 10, 20, 4, T0)]))
    assert await ledger.totals("a") == (0, 7)
    await ledger.commit(LedgerWrite(debits=[debit("a", "api_calls", 20, 30, 5, T0)]))
    assert await ledger.totals("a") == (0, 12)
    assert writer.started == 2


async def test_a_writer_lost_before_its_commit_is_replaced_and_commits_once(
    losing: tuple[SqliteLedger, LosingWriter],
) -> None:
    ledger, writer = losing
    writer.fates = ["before"]
    await ledger.commit(LedgerWrite(debits=[debit("a", "api_calls", 10, 20, 4, T0)]))
    assert await ledger.totals("a") == (0, 7)


async def test_writers_lost_twice_leave_the_retry_to_the_caller(
    losing: tuple[SqliteLedger, LosingWriter],
) -> None:
    ledger, writer = losing
    writer.fates = ["before", "before"]
    write = LedgerWrite(debits=[debit("a", "api_calls", 10, 20, 4, T0)])
    with pytest.raises(WriterLost):
        await ledger.commit(write)
    assert await ledger.totals("a") == (0, 3)  # rolled back
    await ledger.commit(write)  # the caller's retry
    assert await ledger.totals("a") == (0, 7)


async def test_a_refused_transaction_is_a_ledger_error_and_leaves_nothing(
    ledger: SqliteLedger,
) -> None:
    await ledger.commit(LedgerWrite(devices=[device("a")]))
    bad = debit("a", "api_calls", 10, 5, 1, T0)  # to_units below from_units: the CHECK refuses it
    with pytest.raises(LedgerError, match="CHECK constraint"):
        await ledger.commit(LedgerWrite(debits=[debit("a", "api_calls", 0, 10, 3, T0), bad]))
    assert await ledger.totals("a") == (0, 0)
    assert ledger.writer.started == 1  # the writer lives on


async def test_a_value_msgpack_cannot_carry_is_refused_before_it_is_sent(
    ledger: SqliteLedger,
) -> None:
    with pytest.raises(LedgerError):
        await ledger.commit(LedgerWrite(debits=[debit("a", "api_calls", 0, 2**64, 3, T0)]))
    await ledger.commit(LedgerWrite(devices=[device("a")]))
    assert ledger.writer.started == 1  # nothing was sent: the writer goes on


async def test_a_transaction_broken_off_half_sent_commits_none_of_it(
    ledger: SqliteLedger,
) -> None:
    """What breaks the statements off after some went to the writer (a value that cannot
    be encoded, a cancellation) leaves nothing of them: the writer holding them is
    replaced, and the next transaction is not mixed with them."""
    await ledger.commit(LedgerWrite(devices=[device("a")]))
    first = debit("a", "api_calls", 0, 10, 3, T0)
    with pytest.raises(LedgerError):
        await ledger.commit(
            LedgerWrite(
                devices=[device("b")], debits=[first, debit("a", "api_calls", 10, 2**64, 3, T0)]
            )
        )
    await ledger.commit(LedgerWrite(debits=[debit("a", "api_calls", 0, 20, 5, T0)]))
    assert [d.id for d in (await ledger.load()).devices] == ["a"]  # not b
    assert await ledger.totals("a") == (0, 5)
    assert ledger.writer.started == 1  # nothing had gone out yet: the writer stays

    def broken_off(sent: int) -> Iterator[Statement]:
        # parameters of `sent` bytes: past SEND_BYTES, the statement has gone out
        yield "INSERT INTO meta (key, value) VALUES ('half', ?)", [b"x" * sent]
        raise asyncio.CancelledError

    for sent, writers, upto in ((10, 1, 30), (SEND_BYTES, 2, 40)):
        with pytest.raises(asyncio.CancelledError):
            await ledger.writer.transaction(broken_off(sent))
        await ledger.commit(LedgerWrite(debits=[debit("a", "api_calls", upto - 10, upto, 1, T0)]))
        assert await ledger.get_meta("half") is None
        assert ledger.writer.started == writers  # replaced once a statement had gone out
    assert await ledger.totals("a") == (0, 7)


async def test_the_writer_exits_when_the_ledger_closes(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "ledger.sqlite3")
    await ledger.open()
    await ledger.commit(LedgerWrite(devices=[device("a")]))
    process = ledger.writer._process
    assert process is not None
    await ledger.close()
    assert process.returncode == 0


async def test_a_writer_that_cannot_open_the_ledger_says_why(tmp_path: Path) -> None:
    writer = WriterProcess(tmp_path / "no" / "such" / "folder" / "ledger.sqlite3", 5000)
    await writer.start()
    try:
        with pytest.raises(LedgerError, match="could not start: unable to open"):
            await writer.transaction([("SELECT 1", [])])
    finally:
        await writer.close()


async def test_a_gateway_whose_writer_is_killed_mid_stream_charges_every_report_once(
    broker: Any, tmp_path: Path
) -> None:
    """Reports keep coming while the writer is killed, five times: every report is charged,
    none twice (each pool's debits add up to what it used: no transaction ran twice)."""
    devices = [RawDevice(f"writer-{i}") for i in range(3)]
    counts = dict.fromkeys((d.id for d in devices), 0)
    async with running_gateway(broker.url, tmp_path) as gw:
        ledger = gw.service.ledger
        assert isinstance(ledger, SqliteLedger)
        for each in devices:
            await gw.add_device(each.id, each.key, 10**9)
        async with Listener.connect(broker.url) as publisher:
            for kills in range(5):
                for _ in range(40):
                    for each in devices:
                        counts[each.id] += 100  # one token at 0.01
                        report = each.report({"api_calls": counts[each.id]})
                        publisher.publish(gw.topics.usage(each.id), report)
                # Once the writer killed last has been replaced (a batch committed since):
                # reports are still arriving and being committed.
                await gw.wait_committed(lambda k=kills: ledger.writer.started > k, timeout=30)
                pid = ledger.writer.pid
                assert pid is not None
                os.kill(pid, signal.SIGKILL)
            assert await publisher.client.flush(30)
        registry = gw.service.registry
        await gw.wait_committed(
            lambda: all(registry.devices[d.id].used == counts[d.id] // 100 for d in devices),
            timeout=30,
        )
        assert ledger.writer.started >= 5  # each kill took a writer that had committed
    reopened = SqliteLedger(tmp_path / "ledger.sqlite3")
    await reopened.open()
    try:
        snapshot = await assert_conserved(reopened)
        for each in snapshot.devices:
            assert each.used == counts[each.id] // 100
            assert (await reopened.totals(each.id))[1] == each.used
    finally:
        await reopened.close()


@pytest.mark.skipif(not may_raise_priority(PRIORITY_BOOST), reason="may not raise a priority")
async def test_the_writer_runs_above_the_gateways_priority_where_allowed(
    ledger: SqliteLedger,
) -> None:
    pid = ledger.writer.pid
    assert pid is not None
    ours = os.getpriority(os.PRIO_PROCESS, 0)
    assert os.getpriority(os.PRIO_PROCESS, pid) == ours - PRIORITY_BOOST


async def test_without_the_right_to_raise_it_the_writer_runs_at_the_gateways(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refused(which: int, who: int, priority: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "setpriority", refused)
    ledger = SqliteLedger(tmp_path / "ledger.sqlite3")
    with caplog.at_level(logging.INFO, logger="tokenwell.gateway"):
        await ledger.open()
    try:
        await ledger.commit(LedgerWrite(devices=[device("a")]))
        pid = ledger.writer.pid
        assert pid is not None
        assert os.getpriority(os.PRIO_PROCESS, pid) == os.getpriority(os.PRIO_PROCESS, 0)
        assert "CAP_SYS_NICE" in caplog.text
    finally:
        await ledger.close()


async def test_a_retry_of_a_commit_whose_outcome_was_unknown_commits_nothing_twice(
    losing: tuple[SqliteLedger, LosingWriter], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer died after its COMMIT and the marker could not be read: the caller gets
    an error and retries the same write, which finds the marker and commits nothing."""
    ledger, writer = losing
    writer.fates = ["after"]
    read = ledger.get_meta

    async def unreadable_once(key: str) -> bytes | None:
        monkeypatch.setattr(ledger, "get_meta", read)
        raise LedgerError("disk I/O error")

    monkeypatch.setattr(ledger, "get_meta", unreadable_once)
    write = LedgerWrite(debits=[debit("a", "api_calls", 10, 20, 4, T0)])
    with pytest.raises(LedgerError):
        await ledger.commit(write)
    await ledger.commit(write)  # the caller's retry
    assert await ledger.totals("a") == (0, 7)  # once, not twice
    await ledger.commit(LedgerWrite(debits=[debit("a", "api_calls", 20, 30, 5, T0)]))
    assert await ledger.totals("a") == (0, 12)


async def test_a_writer_that_cannot_be_started_is_a_ledger_error(
    ledger: SqliteLedger, monkeypatch: pytest.MonkeyPatch
) -> None:
    await kill_writer(ledger)

    async def no_fork(module: str) -> Any:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr("gateway.children.spawn", no_fork)
    with pytest.raises(LedgerError, match="cannot start the ledger's writer"):
        await ledger.commit(LedgerWrite(devices=[device("a")]))


OWNER_OF_A_WRITER = """
import asyncio, sys
from pathlib import Path
from gateway.writer import WriterProcess

async def main():
    writer = WriterProcess(Path(sys.argv[1]), 5000)
    await writer.start()
    await writer.transaction([])  # ready
    print(writer.pid, flush=True)
    await asyncio.Event().wait()  # until killed

asyncio.run(main())
"""


async def test_a_writer_dies_with_the_process_that_owns_it(tmp_path: Path) -> None:
    """Killed with it, whatever it is doing (PR_SET_PDEATHSIG): here it is stopped, so it
    cannot even see the end of its socket, and still it is gone at once. (A writer that
    outlived a killed gateway could commit a transaction it still had, one waiting for
    another connection's lock, say, after the next gateway had loaded the ledger: found
    in review. Without the fix this test fails, the writer left stopped.)"""
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", OWNER_OF_A_WRITER, str(tmp_path / "ledger.sqlite3"), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert child.stdout is not None
    pid = int(await asyncio.wait_for(child.stdout.readline(), 30))
    writer_exited = os.pidfd_open(pid)
    try:
        os.kill(pid, signal.SIGSTOP)
        child.kill()
        await child.wait()
        ready, _, _ = await asyncio.to_thread(select.select, [writer_exited], [], [], 10)
        assert ready == [writer_exited]
    finally:
        os.close(writer_exited)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
