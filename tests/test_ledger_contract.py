"""One ledger contract, two ledgers: the in-memory fake and SQLite pass the same suite.

Then what only SQLite can show: durability (WAL, ``synchronous=FULL``, a process killed
right after a commit loses nothing), and clear errors for files it cannot use.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import signal
import sqlite3
import sys
import textwrap
from collections.abc import AsyncIterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from gateway.economics import GrantKind, GrantState, Movement, PeriodRule, Pool, TopUpRule
from gateway.errors import LedgerError
from gateway.ledger import (
    Debit,
    HighMark,
    Ledger,
    LedgerWrite,
    MemoryLedger,
    UsageQuery,
    bucket_start,
)
from gateway.metering import Device
from gateway.sqlite_ledger import SqliteLedger
from gateway.statement import Evidence
from gateway.wire import ControlMessage

HOUR = 3_600_000
DAY = 24 * HOUR
T0 = 1_795_000_000_000 - 1_795_000_000_000 % DAY  # a UTC midnight: 2026-11-18T00:00Z
ROOT = Path(__file__).resolve().parent.parent


def utc_ms(*parts: int) -> int:
    moment = dt.datetime(*parts, tzinfo=dt.UTC)  # type: ignore[misc]
    return int(moment.timestamp()) * 1000 + moment.microsecond // 1000


@pytest.fixture(params=["memory", "sqlite"])
async def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Ledger]:
    store: Ledger = (
        MemoryLedger() if request.param == "memory" else SqliteLedger(tmp_path / "l.sqlite3")
    )
    await store.open()
    yield store
    await store.close()


def device(name: str, *, control: bool = False, account: str = "acme") -> Device:
    message = ControlMessage(name, 3, T0, "throttle", 500, 15, "low_balance") if control else None
    return Device(name, bytes(range(32)), account, name, 85, T0, T0 + 1, False, T0 + 2, message, 2)


def debit(
    name: str, meter: str, start: int, end: int, tokens: int, at: int, *, account: str = "acme"
) -> Debit:
    return Debit(name, account, 1, meter, start, end, tokens, at, at + 5, name)


def grant(pool: str, tokens: int, kind: GrantKind, at: int, key: str | None = None) -> Movement:
    return Movement(pool, "acme", "grant", tokens, at, grant_kind=kind, idempotency_key=key)


# --- round trips ------------------------------------------------------------------------------


async def test_devices_with_and_without_control_are_loaded_back_whole(ledger: Ledger) -> None:
    revoked = Device("c", b"\xff" * 32, "other", "@other", 0, 1, 2, True, None, None, 0, cap=5)
    blocked = Device(
        "d", bytes(32), "acme", "d", 2**62, 5, 6, False, 7,
        ControlMessage("d", 2**63 - 1, 2**63 - 1, "block", 0, -(2**63), "exhausted"), 2**63 - 1,
    )  # fmt: skip
    written = [device("a", control=True), device("b"), revoked, blocked]
    await ledger.commit(LedgerWrite(devices=written))
    snapshot = await ledger.load()
    assert sorted(snapshot.devices, key=lambda d: d.id) == written
    assert snapshot.highs == []


async def test_highs_come_back_in_the_snapshot_not_in_the_device_records(ledger: Ledger) -> None:
    """The caller joins them (service.load); both ledgers agree on that split."""
    carrying = Device("a", bytes(32), "acme", "a", 0, 0, 0, highs=((1, "x", 5),))
    marks = [HighMark("a", 1, "api_calls", 500), HighMark("a", 2**63 - 1, "gpu_seconds", 2**63 - 1)]
    await ledger.commit(LedgerWrite(devices=[carrying], highs=marks))
    snapshot = await ledger.load()
    assert [d.highs for d in snapshot.devices] == [()]
    assert sorted(snapshot.highs, key=lambda h: h.boot) == marks


async def test_devices_and_highs_are_upserted_debits_and_grants_appended(ledger: Ledger) -> None:
    await ledger.commit(
        LedgerWrite(
            devices=[device("a")],
            highs=[HighMark("a", 1, "x", 5), HighMark("a", 2, "x", 1)],
            debits=[debit("a", "x", 0, 5, 5, T0)],
            movements=[grant("a", 100, "initial", T0)],
        )
    )
    changed = Device("a", bytes(range(32)), "acme", "a", 90, T0, T0 + 9, period_ms=T0)
    await ledger.commit(
        LedgerWrite(
            devices=[changed],
            highs=[HighMark("a", 1, "x", 9)],
            debits=[debit("a", "x", 5, 9, 4, T0 + 1)],
            movements=[grant("a", 100, "refill", T0 + 1)],
        )
    )
    snapshot = await ledger.load()
    assert snapshot.devices == [changed]
    assert sorted((h.boot, h.meter, h.high) for h in snapshot.highs) == [(1, "x", 9), (2, "x", 1)]
    assert await ledger.totals("a") == (200, 9)


async def test_a_write_larger_than_one_statement_comes_back_whole_and_in_order(
    ledger: Ledger,
) -> None:
    """SQLite writes many rows per statement, up to its limit on parameters (32,766): a
    batch past it spans several statements, and rows apply in order (a later upsert of a
    key wins, debits keep their order)."""
    names = [f"d{i:05d}" for i in range(2_000)]  # x 18 columns: two device statements
    marks = [HighMark(name, 1, "x", step) for step in (1, 2, 3, 4, 5) for name in names]
    debits = [debit(name, "x", 0, 1 + i, 1, T0 + i) for i, name in enumerate(names * 2)]
    await ledger.commit(
        LedgerWrite(devices=[device(name) for name in names], highs=marks, debits=debits)
    )
    snapshot = await ledger.load()
    assert sorted(d.id for d in snapshot.devices) == names
    assert {(h.device, h.high) for h in snapshot.highs} == {(name, 5) for name in names}
    rows = await ledger.usage(UsageQuery(bucket="all"))
    assert sum(row.tokens for row in rows) == len(debits)


async def test_writes_combined_into_one_commit_as_if_committed_one_by_one(
    tmp_path: Path,
) -> None:
    """Group commit: ``LedgerWrite.combined`` leaves the ledger exactly as the writes
    committed one after the other (last value of each row, every debit, the latest
    evidence)."""
    evidence = [Evidence("a", 1, n, T0, f"a-{n}".encode()) for n in (5, 9, 7)]
    writes = [
        LedgerWrite(
            devices=[device("a"), device("b")],
            pools=[Pool("a", "acme", allocation=100)],
            highs=[HighMark("a", 1, "x", 5)],
            debits=[debit("a", "x", 0, 5, 5, T0)],
            movements=[grant("a", 100, "initial", T0)],
            evidence=evidence[:1],
        ),
        LedgerWrite(
            devices=[device("a")._replace(used=90)],
            pools=[Pool("a", "acme", allocation=100, used=9)],
            highs=[HighMark("a", 1, "x", 9), HighMark("a", 2, "x", 1)],
            debits=[debit("a", "x", 5, 9, 4, T0 + 1)],
            evidence=evidence[1:],
        ),
    ]
    one_by_one, together = SqliteLedger(tmp_path / "a.db"), SqliteLedger(tmp_path / "b.db")
    for store in (one_by_one, together):
        await store.open()
    try:
        for write in writes:
            await one_by_one.commit(write)
        await together.commit(LedgerWrite.combined(writes))
        first, second = await one_by_one.load(), await together.load()
        assert sorted(first.devices, key=lambda d: d.id) == sorted(
            second.devices, key=lambda d: d.id
        )
        assert sorted(first.highs, key=str) == sorted(second.highs, key=str)
        assert first.pools == second.pools
        for store in (one_by_one, together):
            assert await store.totals("a") == (100, 9)
            assert await store.evidence(["a"], T0 + 1) == [evidence[1]]  # n 9, not 7
        query = UsageQuery(bucket="hour")
        assert await one_by_one.usage(query) == await together.usage(query)
    finally:
        for store in (one_by_one, together):
            await store.close()


async def test_an_empty_write_changes_nothing(ledger: Ledger) -> None:
    await ledger.commit(LedgerWrite())
    snapshot = await ledger.load()
    assert (snapshot.devices, snapshot.highs) == ([], [])
    assert not LedgerWrite()


async def test_totals_are_the_sums_of_grants_and_debits_per_device(ledger: Ledger) -> None:
    await ledger.commit(
        LedgerWrite(
            debits=[debit("a", "x", 0, 5, 5, T0), debit("a", "y", 0, 1, 0, T0),
                    debit("b", "x", 0, 9, 9, T0)],
            movements=[grant("a", 100, "initial", T0), grant("a", 2**62, "refill", T0),
                    grant("b", 7, "initial", T0)],
        )
    )  # fmt: skip
    assert await ledger.totals("a") == (100 + 2**62, 5)
    assert await ledger.totals("b") == (7, 9)
    assert await ledger.totals("nobody") == (0, 0)


async def test_a_grant_is_found_by_device_and_idempotency_key(ledger: Ledger) -> None:
    wanted = grant("a", 40, "refill", T0, "key-1")
    await ledger.commit(
        LedgerWrite(movements=[grant("a", 100, "initial", T0), wanted,
                            grant("b", 41, "refill", T0, "key-2")])
    )  # fmt: skip
    assert await ledger.find_grant("a", "key-1") == wanted
    assert await ledger.find_grant("a", "key-2") is None
    assert await ledger.find_grant("b", "key-1") is None
    assert await ledger.find_grant("nobody", "key-1") is None


async def test_grants_without_a_key_never_clash_and_one_key_serves_two_devices(
    ledger: Ledger,
) -> None:
    await ledger.commit(LedgerWrite(movements=[grant("a", 1, "refill", T0)] * 3))
    await ledger.commit(
        LedgerWrite(movements=[grant("a", 1, "refill", T0, "k"),
                            grant("b", 2, "refill", T0, "k")])
    )  # fmt: skip
    assert await ledger.totals("a") == (4, 0)
    found = await ledger.find_grant("b", "k")
    assert found is not None
    assert found.tokens == 2


async def test_meta_values_are_bytes_kept_by_key(ledger: Ledger) -> None:
    assert await ledger.get_meta("k") is None
    await ledger.set_meta("k", b"\x00\x01")
    await ledger.set_meta("other", b"")
    assert await ledger.get_meta("k") == b"\x00\x01"
    await ledger.set_meta("k", b"\x02")
    assert (await ledger.get_meta("k"), await ledger.get_meta("other")) == (b"\x02", b"")


# --- usage ----------------------------------------------------------------------------------

USAGE = [
    debit("a", "api_calls", 0, 100, 1, T0 + 10),
    debit("a", "api_calls", 100, 300, 2, T0 + HOUR + 10),
    debit("a", "gpu_seconds", 0, 6, 2, T0 + HOUR + 20),
    debit("b", "api_calls", 0, 50, 1, T0 + 25 * HOUR, account="beta"),
    debit("c", "api_calls", 0, 7, 1, T0 + 2 * HOUR, account="beta"),
]


async def usage_rows(ledger: Ledger, **query: Any) -> list[tuple[Any, ...]]:
    rows = await ledger.usage(UsageQuery(**query))
    return [(r.bucket_start_ms, r.device, r.account, r.meter, r.units, r.tokens) for r in rows]


@pytest.mark.parametrize(
    ("query", "want"),
    [
        pytest.param({}, [(None, "a", "acme", "api_calls", 300, 3),
                          (None, "a", "acme", "gpu_seconds", 6, 2),
                          (None, "b", "beta", "api_calls", 50, 1),
                          (None, "c", "beta", "api_calls", 7, 1)], id="everything"),
        pytest.param({"device": "a"}, [(None, "a", "acme", "api_calls", 300, 3),
                                       (None, "a", "acme", "gpu_seconds", 6, 2)], id="device"),
        pytest.param({"account": "beta"}, [(None, "b", "beta", "api_calls", 50, 1),
                                           (None, "c", "beta", "api_calls", 7, 1)], id="account"),
        pytest.param({"meter": "gpu_seconds"}, [(None, "a", "acme", "gpu_seconds", 6, 2)],
                     id="meter"),
        pytest.param({"since_ms": T0 + HOUR + 10}, [(None, "a", "acme", "api_calls", 200, 2),
                                                    (None, "a", "acme", "gpu_seconds", 6, 2),
                                                    (None, "b", "beta", "api_calls", 50, 1),
                                                    (None, "c", "beta", "api_calls", 7, 1)],
                     id="since is inclusive"),
        pytest.param({"until_ms": T0 + HOUR + 20}, [(None, "a", "acme", "api_calls", 300, 3)],
                     id="until is exclusive"),
        pytest.param({"since_ms": T0 + HOUR, "until_ms": T0 + 2 * HOUR},
                     [(None, "a", "acme", "api_calls", 200, 2),
                      (None, "a", "acme", "gpu_seconds", 6, 2)], id="a window"),
        pytest.param({"device": "a", "meter": "api_calls", "bucket": "hour"},
                     [(T0, "a", "acme", "api_calls", 100, 1),
                      (T0 + HOUR, "a", "acme", "api_calls", 200, 2)], id="hour buckets"),
        pytest.param({"meter": "api_calls", "bucket": "day"},
                     [(T0, "a", "acme", "api_calls", 300, 3),
                      (T0, "c", "beta", "api_calls", 7, 1),
                      (T0 + DAY, "b", "beta", "api_calls", 50, 1)], id="day buckets"),
        pytest.param({"account": "acme", "device": "b"}, [], id="filters combine"),
        pytest.param({"device": "nobody"}, [], id="nothing matches"),
    ],
)  # fmt: skip
async def test_usage_by_filter_and_bucket(
    ledger: Ledger, query: dict[str, Any], want: list[tuple[Any, ...]]
) -> None:
    await ledger.commit(LedgerWrite(debits=USAGE))
    assert await usage_rows(ledger, **query) == want


async def test_month_buckets_start_on_the_first_of_the_month_in_utc(ledger: Ledger) -> None:
    moments = [
        utc_ms(2026, 11, 30, 23, 59, 59, 999_000),
        utc_ms(2026, 12, 1),
        utc_ms(2026, 12, 31, 23, 59, 59, 999_000),
        utc_ms(2027, 1, 1),
        utc_ms(2028, 2, 29, 12),
    ]
    debits = [debit("a", "x", i, i + 1, 1, at) for i, at in enumerate(moments)]
    await ledger.commit(LedgerWrite(debits=debits))
    rows = await usage_rows(ledger, bucket="month")
    assert [(start, units) for start, *_, units, _ in rows] == [
        (utc_ms(2026, 11, 1), 1),
        (utc_ms(2026, 12, 1), 2),
        (utc_ms(2027, 1, 1), 1),
        (utc_ms(2028, 2, 1), 1),
    ]


@pytest.mark.parametrize(
    ("at", "bucket", "start"),
    [
        (T0 + HOUR - 1, "hour", T0), (T0 + HOUR, "hour", T0 + HOUR), (T0 + DAY - 1, "day", T0),
        (T0 + DAY, "day", T0 + DAY), (utc_ms(2027, 1, 1) - 1, "month", utc_ms(2026, 12, 1)),
        (utc_ms(2027, 1, 1), "month", utc_ms(2027, 1, 1)), (0, "month", 0), (T0 + 5, "all", None),
    ],
)  # fmt: skip
def test_bucket_start_is_the_utc_start_of_the_bucket(at: int, bucket: Any, start: int) -> None:
    assert bucket_start(at, bucket) == start


async def test_usage_sums_are_exact_beyond_64_bits(ledger: Ledger) -> None:
    """A free meter counted to 2**63-1 in two boot epochs: SQLite's SUM alone would overflow."""
    big = 2**63 - 1
    await ledger.commit(
        LedgerWrite(
            debits=[
                Debit("a", "acme", 1, "free", 0, big, big, T0, T0, "a"),
                Debit("a", "acme", 2, "free", 0, big, big, T0, T0, "a"),
                Debit("b", "acme", 1, "free", 0, big, 0, T0, T0, "b"),
            ]
        )
    )
    assert await usage_rows(ledger) == [
        (None, "a", "acme", "free", 2 * big, 2 * big),
        (None, "b", "acme", "free", big, 0),
    ]
    assert await usage_rows(ledger, meter="free", bucket="day") == [
        (T0, "a", "acme", "free", 2 * big, 2 * big),
        (T0, "b", "acme", "free", big, 0),
    ]
    assert await ledger.totals("a") == (0, 2 * big)


# --- all or nothing ------------------------------------------------------------------------


async def test_a_write_refused_mid_way_applies_nothing(ledger: Ledger) -> None:
    """A second grant with a used (device, idempotency key) fails the whole transaction."""
    await ledger.commit(LedgerWrite(movements=[grant("a", 1, "refill", T0, "k")]))
    clash = LedgerWrite(
        devices=[device("a")],
        highs=[HighMark("a", 1, "x", 5)],
        debits=[debit("a", "x", 0, 5, 5, T0)],
        movements=[grant("a", 9, "refill", T0), grant("a", 1, "refill", T0, "k")],
    )
    with pytest.raises(LedgerError):
        await ledger.commit(clash)
    snapshot = await ledger.load()
    assert (snapshot.devices, snapshot.highs) == ([], [])
    assert await ledger.totals("a") == (1, 0)
    assert await ledger.usage(UsageQuery()) == []
    await ledger.commit(LedgerWrite(devices=[device("a")]))  # and the ledger still works
    assert [d.id for d in (await ledger.load()).devices] == ["a"]


async def test_the_same_idempotency_key_twice_in_one_write_is_refused(ledger: Ledger) -> None:
    twice = [grant("a", 1, "refill", T0, "k"), grant("a", 1, "refill", T0, "k")]
    with pytest.raises(LedgerError):
        await ledger.commit(LedgerWrite(movements=twice))
    assert await ledger.totals("a") == (0, 0)


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(Debit("a", "acme", 1, "x", 5, 5, 0, T0, T0, "a"), id="no advance"),
        pytest.param(Debit("a", "acme", 1, "x", 5, 4, 0, T0, T0, "a"), id="backwards"),
        pytest.param(Debit("a", "acme", 1, "x", 0, 4, -1, T0, T0, "a"), id="negative tokens"),
        pytest.param(
            Debit("a", "acme", 1, "x", 0, 4, 2**63, T0, T0, "a"), id="tokens past 64 bits"
        ),
    ],
)
async def test_a_debit_that_breaks_the_rules_is_refused_with_nothing_applied(
    ledger: Ledger, bad: Debit
) -> None:
    good = debit("a", "x", 0, 5, 5, T0)
    with pytest.raises(LedgerError):
        await ledger.commit(LedgerWrite(devices=[device("a")], debits=[good, bad]))
    assert await ledger.totals("a") == (0, 0)
    assert (await ledger.load()).devices == []


# --- SQLite only: durability and errors ------------------------------------------------------


async def test_the_writer_runs_in_wal_mode_with_synchronous_full(tmp_path: Path) -> None:
    """The writer process's own connection, which runs every transaction, says so; its
    temporary files (statement journals) are kept in memory, not created on disk."""
    ledger = SqliteLedger(tmp_path / "l.sqlite3")
    await ledger.open()
    try:
        await ledger.commit(LedgerWrite(devices=[device("a")]))
        settings = ledger.writer.connection_settings
        assert settings["journal_mode"] == "wal"
        assert settings["synchronous"] == 2  # FULL: survives power loss, not only a crash
        assert settings["temp_store"] == 2  # MEMORY
    finally:
        await ledger.close()


async def test_a_commit_survives_closing_and_reopening(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite3"
    ledger = SqliteLedger(path)
    await ledger.open()
    await ledger.commit(LedgerWrite(devices=[device("a", control=True)], movements=[
        grant("a", 100, "initial", T0, "k")]))  # fmt: skip
    await ledger.close()
    with sqlite3.connect(path) as raw:  # another process's view
        assert raw.execute("SELECT SUM(tokens) FROM movements").fetchone() == (100,)
    again = SqliteLedger(path)
    await again.open()
    try:
        assert (await again.load()).devices == [device("a", control=True)]
        assert await again.find_grant("a", "k") is not None
    finally:
        await again.close()


async def test_a_process_killed_right_after_a_commit_loses_nothing(tmp_path: Path) -> None:
    """No close, no checkpoint: the committed transaction is in the WAL on disk. (The
    process and its writer are killed together: a writer left alone would close the
    ledger cleanly, checkpointing it.)"""
    path = tmp_path / "l.sqlite3"
    script = textwrap.dedent(
        """
        import asyncio, os, signal, sys
        from pathlib import Path
        from gateway.economics import Movement
        from gateway.ledger import Debit, LedgerWrite
        from gateway.sqlite_ledger import SqliteLedger

        async def main():
            ledger = SqliteLedger(Path(sys.argv[1]))
            await ledger.open()
            await ledger.commit(LedgerWrite(
                movements=[Movement("a", "acme", "grant", 100, 1, grant_kind="initial")],
                debits=[Debit("a", "acme", 1, "x", 0, 7, 7, 1, 1, "a")]))
            os.killpg(0, signal.SIGKILL)  # this process and the writer, at once

        asyncio.run(main())
        """
    )
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, str(path), cwd=ROOT, start_new_session=True
    )
    assert await asyncio.wait_for(child.wait(), 60) == -signal.SIGKILL
    assert path.with_name("l.sqlite3-wal").exists()  # not checkpointed: recovered on open
    ledger = SqliteLedger(path)
    await ledger.open()
    try:
        assert await ledger.totals("a") == (100, 7)
    finally:
        await ledger.close()


async def test_a_path_with_uri_characters_is_one_file_for_reader_and_writer(
    tmp_path: Path,
) -> None:
    """The read-only connection opens a file: URI; '#', '?' and '%' must stay in the path."""
    path = tmp_path / "odd #dir?x=%41" / "l.sqlite3"
    ledger = SqliteLedger(path)
    await ledger.open()
    try:
        await ledger.commit(LedgerWrite(debits=[debit("a", "x", 0, 5, 5, T0)]))
        assert await ledger.totals("a") == (0, 5)  # the reader sees the writer's file
        assert len(await ledger.usage(UsageQuery())) == 1
    finally:
        await ledger.close()
    assert path.exists()


async def test_a_ledger_that_is_not_open_raises_ledger_error(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "l.sqlite3")
    with pytest.raises(LedgerError, match="not open"):
        await ledger.commit(LedgerWrite())
    await ledger.open()
    await ledger.close()
    with pytest.raises(LedgerError, match="not open"):
        await ledger.load()
    with pytest.raises(LedgerError, match="not open"):
        await ledger.usage(UsageQuery())


async def test_a_corrupt_file_is_a_clear_ledger_error(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(LedgerError, match="not a database"):
        await SqliteLedger(path).open()


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite3"
    ledger = SqliteLedger(path)
    await ledger.open()
    await ledger.close()
    with sqlite3.connect(path) as raw:
        raw.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (b"3",))
    with pytest.raises(LedgerError, match="schema 3"):
        await SqliteLedger(path).open()


async def test_a_corrupt_stored_control_message_is_a_ledger_error_on_load(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite3"
    ledger = SqliteLedger(path)
    await ledger.open()
    await ledger.commit(LedgerWrite(devices=[device("a", control=True)]))
    with sqlite3.connect(path) as raw:
        raw.execute("UPDATE devices SET ctl_s = 'paused'")
    try:
        with pytest.raises(LedgerError, match="cannot load"):
            await ledger.load()
    finally:
        await ledger.close()


async def test_pools_are_upserted_and_come_back_whole(ledger: Ledger) -> None:
    grants = (GrantState(3, "rollover", 30, 12, 0, T0 + DAY, T0),
              GrantState(5, "grant", 2**62, 2**62 - 1, 1000, None, T0 + 1))  # fmt: skip
    pool = Pool(
        "@acme", "acme", "overage", 50, PeriodRule("month", T0 - 31 * DAY, 100, 30), T0,
        T0 + DAY, 2**62 + 30, 20, 5, 3, 4, grants, (Fraction(1, 2), Fraction(1, 3)),
        (Fraction(1, 3),), TopUpRule(10, 100), False, 7,
    )  # fmt: skip
    simple = Pool("a", "acme")
    await ledger.commit(LedgerWrite(pools=[pool, simple]))
    changed = simple._replace(used=9, grants=(), next_seq=2)
    await ledger.commit(LedgerWrite(pools=[changed]))
    assert sorted((await ledger.load()).pools, key=lambda p: p.key) == [pool, changed]


async def test_evidence_keeps_the_latest_report_per_device_epoch_and_hour(ledger: Ledger) -> None:
    def kept(device: str, boot: int, n: int, hour: int) -> Evidence:
        return Evidence(device, boot, n, T0 + hour * HOUR, f"{device}-{boot}-{n}".encode())

    await ledger.commit(LedgerWrite(evidence=[kept("a", 1, 5, 0), kept("a", 1, 9, 1),
                                              kept("a", 2, 1, 1), kept("b", 1, 3, 0)]))  # fmt: skip
    await ledger.commit(LedgerWrite(evidence=[kept("a", 1, 7, 0), kept("a", 1, 4, 1)]))
    assert await ledger.evidence(["a"], T0 + HOUR) == [kept("a", 1, 7, 0)]  # 7 replaced 5
    assert await ledger.evidence(["a", "b"], T0 + 2 * HOUR) == [
        kept("a", 1, 9, 1),
        kept("a", 2, 1, 1),
        kept("b", 1, 3, 0),
    ]  # fmt: skip  -- an older n (4) never replaces a later one (9)
    assert await ledger.evidence(["a"], T0) == []
    assert await ledger.evidence(["nobody"], T0 + DAY) == []


SCHEMA_1 = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY, public_key BLOB NOT NULL, account TEXT NOT NULL,
    allocation INTEGER NOT NULL, used INTEGER NOT NULL,
    created_ms INTEGER NOT NULL, updated_ms INTEGER NOT NULL, revoked INTEGER NOT NULL,
    last_report_ms INTEGER,
    ctl_n INTEGER, ctl_t INTEGER, ctl_s TEXT, ctl_r INTEGER, ctl_bal INTEGER, ctl_why TEXT,
    ctl_sent INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS highs (
    device TEXT NOT NULL, boot INTEGER NOT NULL, meter TEXT NOT NULL, high INTEGER NOT NULL,
    PRIMARY KEY (device, boot, meter)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS debits (
    seq INTEGER PRIMARY KEY, device TEXT NOT NULL, account TEXT NOT NULL,
    boot INTEGER NOT NULL, meter TEXT NOT NULL,
    from_units INTEGER NOT NULL, to_units INTEGER NOT NULL, tokens INTEGER NOT NULL,
    at_ms INTEGER NOT NULL, received_ms INTEGER NOT NULL,
    CHECK (to_units > from_units AND tokens >= 0)
);
CREATE INDEX IF NOT EXISTS debits_at ON debits (at_ms);
CREATE INDEX IF NOT EXISTS debits_device_at ON debits (device, at_ms);
CREATE TABLE IF NOT EXISTS grants (
    seq INTEGER PRIMARY KEY, device TEXT NOT NULL, account TEXT NOT NULL,
    tokens INTEGER NOT NULL, kind TEXT NOT NULL, at_ms INTEGER NOT NULL,
    idempotency_key TEXT, UNIQUE (device, idempotency_key)
);
"""


async def test_a_schema_1_ledger_is_migrated_in_place(tmp_path: Path) -> None:
    """The ledger of the release before pools: each device becomes its own prepaid pool,
    its grants movements (idempotency keys kept), its debits booked on that pool."""
    path = tmp_path / "l.sqlite3"
    with sqlite3.connect(path) as raw:
        raw.executescript(SCHEMA_1)
        raw.execute("INSERT INTO meta VALUES ('schema', ?)", (b"1",))
        raw.execute(
            "INSERT INTO devices (id, public_key, account, allocation, used, created_ms,"
            " updated_ms, revoked, ctl_n, ctl_t, ctl_s, ctl_r, ctl_bal, ctl_why, ctl_sent)"
            " VALUES ('a', ?, 'acme', 100, 30, 1, 2, 0, 2, 3, 'ok', 1000, 70, 'refill', 2),"
            " ('b', ?, 'acme', 5, 9, 1, 2, 0, NULL, NULL, NULL, NULL, NULL, NULL, 0)",
            (bytes(32), bytes(32)),
        )
        raw.execute(
            "INSERT INTO grants (device, account, tokens, kind, at_ms, idempotency_key) VALUES"
            " ('a', 'acme', 80, 'initial', 1, NULL), ('a', 'acme', 20, 'refill', 2, 'k'),"
            " ('b', 'acme', 5, 'initial', 1, NULL)"
        )
        raw.execute(
            "INSERT INTO debits (device, account, boot, meter, from_units, to_units, tokens,"
            " at_ms, received_ms) VALUES ('a', 'acme', 1, 'x', 0, 30, 30, 5, 5),"
            " ('b', 'acme', 1, 'x', 0, 9, 9, 5, 5)"
        )
    ledger = SqliteLedger(path)
    await ledger.open()
    try:
        snapshot = await ledger.load()
        pools = {p.key: p for p in snapshot.pools}
        assert (pools["a"].balance, [g.remaining for g in pools["a"].grants]) == (70, [70])
        assert (pools["b"].balance, pools["b"].grants) == (-4, ())
        assert [(d.id, d.pool, d.used) for d in snapshot.devices] == [("a", "a", 30), ("b", "b", 9)]
        assert await ledger.totals("a") == (100, 30)
        assert await ledger.totals("b") == (5, 9)
        found = await ledger.find_grant("a", "k")
        assert found is not None
        assert (found.tokens, found.grant_kind) == (20, "refill")
        await ledger.commit(LedgerWrite(devices=[snapshot.devices[0]._replace(used=31)]))
    finally:
        await ledger.close()
    again = SqliteLedger(path)  # opened again: schema 2, nothing migrated twice
    await again.open()
    try:
        assert await again.totals("a") == (100, 30)
    finally:
        await again.close()


async def test_loaded_records_share_equal_strings_and_time_stamps(tmp_path: Path) -> None:
    """Memory at 100,000 devices: equal accounts, control states and reasons, meters and
    a dedicated pool's key are one object each, not one per device."""
    store = SqliteLedger(tmp_path / "l.sqlite3")
    await store.open()
    try:
        marks = [HighMark("a", 1, "api_calls", 5), HighMark("b", 1, "api_calls", 7)]
        pools = [Pool("a", "acme"), Pool("b", "acme")]
        await store.commit(
            LedgerWrite(devices=[device("a", control=True), device("b", control=True)],
                        highs=marks, pools=pools)
        )  # fmt: skip
        snapshot = await store.load()
    finally:
        await store.close()
    a, b = sorted(snapshot.devices, key=lambda d: d.id)
    assert a.account is b.account
    assert a.control is not None
    assert b.control is not None
    assert a.control.state is b.control.state
    assert a.control.why is b.control.why
    assert snapshot.highs[0].meter is snapshot.highs[1].meter
    pool_a = next(p for p in snapshot.pools if p.key == "a")
    assert pool_a.key is a.id
    assert a.pool is a.id
