"""One contract, two ledgers: the in-memory fake and SQLite pass the same tests."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import LedgerError
from gateway.ledger import Debit, Grant, HighMark, LedgerWrite, MemoryLedger, UsageQuery
from gateway.metering import Device
from gateway.sqlite_ledger import SqliteLedger
from gateway.wire import ControlMessage

HOUR = 3_600_000
T0 = 1_795_000_000_000 - 1_795_000_000_000 % (24 * HOUR)  # a UTC midnight


@pytest.fixture(params=["memory", "sqlite"])
async def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    store = MemoryLedger() if request.param == "memory" else SqliteLedger(tmp_path / "l.sqlite3")
    await store.open()
    yield store
    await store.close()


def device(name: str, *, control: bool = False) -> Device:
    message = ControlMessage(name, 3, T0, "throttle", 500, 15, "low_balance") if control else None
    return Device(name, bytes(range(32)), "acme", 100, 85, T0, T0 + 1, False, T0 + 2, message, 2)


def debit(name: str, meter: str, start: int, end: int, tokens: int, at: int) -> Debit:
    return Debit(name, "acme", 1, meter, start, end, tokens, at, at)


async def test_a_commit_is_loaded_back_whole(ledger: Any) -> None:
    write = LedgerWrite(
        devices=[device("a", control=True), device("b")],
        highs=[HighMark("a", 1, "api_calls", 500), HighMark("a", 2, "gpu_seconds", 7)],
        debits=[debit("a", "api_calls", 0, 500, 5, T0)],
        grants=[Grant("a", "acme", 100, "initial", T0), Grant("b", "acme", 100, "initial", T0)],
    )
    await ledger.commit(write)
    snapshot = await ledger.load()
    loaded = {d.id: d for d in snapshot.devices}
    assert loaded["a"] == device("a", control=True)
    assert loaded["b"] == device("b")
    assert sorted((h.device, h.boot, h.meter, h.high) for h in snapshot.highs) == [
        ("a", 1, "api_calls", 500), ("a", 2, "gpu_seconds", 7),
    ]  # fmt: skip
    assert await ledger.totals("a") == (100, 5)
    assert await ledger.totals("nobody") == (0, 0)


async def test_upserts_replace_devices_and_highs(ledger: Any) -> None:
    await ledger.commit(LedgerWrite(devices=[device("a")], highs=[HighMark("a", 1, "x", 5)]))
    changed = Device("a", bytes(range(32)), "acme", 200, 90, T0, T0 + 9)
    await ledger.commit(LedgerWrite(devices=[changed], highs=[HighMark("a", 1, "x", 9)]))
    snapshot = await ledger.load()
    assert snapshot.devices == [changed]
    assert [(h.meter, h.high) for h in snapshot.highs] == [("x", 9)]


async def test_grants_are_found_by_idempotency_key(ledger: Any) -> None:
    grant = Grant("a", "acme", 40, "refill", T0, "key-1")
    await ledger.commit(LedgerWrite(grants=[grant]))
    assert await ledger.find_grant("a", "key-1") == grant
    assert await ledger.find_grant("a", "key-2") is None
    assert await ledger.find_grant("b", "key-1") is None


async def test_usage_by_filter_and_bucket(ledger: Any) -> None:
    debits = [
        debit("a", "api_calls", 0, 100, 1, T0 + 10),
        debit("a", "api_calls", 100, 300, 2, T0 + HOUR + 10),
        debit("a", "gpu_seconds", 0, 6, 2, T0 + HOUR + 20),
        debit("b", "api_calls", 0, 50, 1, T0 + 25 * HOUR),
    ]
    await ledger.commit(LedgerWrite(debits=debits))

    async def rows(**query: Any) -> list[tuple[Any, ...]]:
        result = await ledger.usage(UsageQuery(**query))
        return [(r.bucket_start_ms, r.device, r.meter, r.units, r.tokens) for r in result]

    assert await rows() == [
        (None, "a", "api_calls", 300, 3),
        (None, "a", "gpu_seconds", 6, 2),
        (None, "b", "api_calls", 50, 1),
    ]
    assert await rows(device="a", meter="api_calls", bucket="hour") == [
        (T0, "a", "api_calls", 100, 1), (T0 + HOUR, "a", "api_calls", 200, 2),
    ]  # fmt: skip
    assert await rows(bucket="day", meter="api_calls") == [
        (T0, "a", "api_calls", 300, 3), (T0 + 24 * HOUR, "b", "api_calls", 50, 1),
    ]  # fmt: skip
    assert await rows(since_ms=T0 + HOUR, until_ms=T0 + 2 * HOUR) == [
        (None, "a", "api_calls", 200, 2), (None, "a", "gpu_seconds", 6, 2),
    ]  # fmt: skip
    assert await rows(account="nobody") == []


async def test_month_buckets_start_on_the_first_in_utc(ledger: Any) -> None:
    nov_30 = 1_796_040_000_000  # 2026-11-30T10:40Z
    dec_01 = 1_796_130_000_000  # 2026-12-01T11:40Z
    await ledger.commit(
        LedgerWrite(debits=[debit("a", "x", 0, 1, 1, nov_30), debit("a", "x", 1, 3, 1, dec_01)])
    )
    result = await ledger.usage(UsageQuery(bucket="month"))
    assert [(r.bucket_start_ms, r.units) for r in result] == [
        (1_793_491_200_000, 1),  # 2026-11-01T00:00Z
        (1_796_083_200_000, 2),  # 2026-12-01T00:00Z
    ]


async def test_meta_values(ledger: Any) -> None:
    assert await ledger.get_meta("k") is None
    await ledger.set_meta("k", b"\x00\x01")
    assert await ledger.get_meta("k") == b"\x00\x01"


async def test_sqlite_commits_all_or_nothing(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "l.sqlite3")
    await ledger.open()
    try:
        await ledger.commit(LedgerWrite(grants=[Grant("a", "acme", 1, "refill", T0, "k")]))
        clash = LedgerWrite(
            devices=[device("a")],
            debits=[debit("a", "x", 0, 5, 5, T0)],
            grants=[Grant("a", "acme", 1, "refill", T0, "k")],  # the same idempotency key
        )
        with pytest.raises(LedgerError):
            await ledger.commit(clash)
        snapshot = await ledger.load()
        assert snapshot.devices == []
        assert await ledger.totals("a") == (1, 0)
    finally:
        await ledger.close()


async def test_sqlite_is_durable_wal_full_and_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite3"
    ledger = SqliteLedger(path)
    await ledger.open()
    await ledger.commit(LedgerWrite(devices=[device("a")], debits=[debit("a", "x", 0, 5, 5, T0)]))
    writer = ledger._w
    async with writer.execute("PRAGMA journal_mode") as cursor:
        assert (await cursor.fetchone())[0] == "wal"
    async with writer.execute("PRAGMA synchronous") as cursor:
        assert (await cursor.fetchone())[0] == 2  # FULL
    await ledger.close()
    with sqlite3.connect(path) as raw:  # another process's view
        assert raw.execute("SELECT SUM(tokens) FROM debits").fetchone() == (5,)
    again = SqliteLedger(path)
    await again.open()
    assert [d.id for d in (await again.load()).devices] == ["a"]
    await again.close()


async def test_a_corrupt_file_is_a_clear_ledger_error(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(LedgerError, match="not a database"):
        await SqliteLedger(path).open()
