"""Packed records: every device and pool comes back whole; what start-up reads of a packed
record without unpacking it (summary, next due time) is what the record says; the
SQLite ledger's packed start-up state is the state it stores."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.economics import (
    GRANT_KINDS,
    POLICIES,
    GrantState,
    PeriodRule,
    Pool,
    TopUpRule,
    next_due_ms,
)
from gateway.ingest import Registry
from gateway.ledger import HighMark, LedgerWrite, MemoryLedger
from gateway.metering import Device
from gateway.packing import (
    pack_device,
    pack_pool,
    packed_device_pool,
    packed_public_key,
    pool_due_ms,
    summarize,
    summarize_device,
    unpack_device,
    unpack_pool,
)
from gateway.sqlite_ledger import SqliteLedger
from gateway.wire import ControlMessage, ControlState

U63 = st.integers(0, 2**63 - 1)
I64 = st.integers(-(2**63), 2**63 - 1)
STATES: list[ControlState] = ["ok", "throttle", "block"]
IDS = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,20}", fullmatch=True)


@st.composite
def controls(draw: st.DrawFn, device: str) -> ControlMessage:
    state = draw(st.sampled_from(STATES))
    rate = {"ok": 1000, "block": 0}.get(state, draw(st.integers(1, 999)))
    why = draw(st.sampled_from(["ok", "provisioned", "low_balance", "exhausted", "refill"]))
    return ControlMessage(device, draw(U63), draw(U63), state, rate, draw(I64), why)


@st.composite
def devices(draw: st.DrawFn) -> Device:
    device_id = draw(IDS)
    pool = draw(st.one_of(st.just(device_id), IDS.map(lambda a: "@" + a)))
    highs = draw(st.dictionaries(st.tuples(U63, st.sampled_from(["api_calls", "gb"])), U63))
    return Device(
        device_id, draw(st.binary(min_size=32, max_size=32)), draw(IDS), pool, draw(I64),
        draw(U63), draw(U63), draw(st.booleans()), draw(st.none() | U63),
        draw(st.none() | controls(device_id)), draw(U63),
        tuple(sorted((boot, meter, high) for (boot, meter), high in highs.items())),
        draw(st.none() | U63), draw(U63),
    )  # fmt: skip


@st.composite
def grants(draw: st.DrawFn) -> GrantState:
    kind = draw(st.sampled_from(GRANT_KINDS))
    return GrantState(
        draw(U63), kind, draw(U63), draw(U63), draw(I64), draw(st.none() | U63), draw(U63)
    )


fractions = st.builds(Fraction, st.integers(1, 99), st.integers(100, 1000))


@st.composite
def pools(draw: st.DrawFn) -> Pool:
    period = draw(
        st.none() | st.builds(PeriodRule, st.sampled_from(["day", "week", "month"]), U63, U63, U63)
    )
    return Pool(
        draw(IDS | IDS.map(lambda a: "@" + a)), draw(IDS),
        draw(st.sampled_from(POLICIES)), draw(U63), period,
        draw(U63), draw(st.none() | U63), draw(I64), draw(I64), draw(I64), draw(I64), draw(I64),
        tuple(draw(st.lists(grants(), max_size=4))),
        tuple(draw(st.lists(fractions, max_size=3))), tuple(draw(st.lists(fractions, max_size=3))),
        draw(st.none() | st.builds(TopUpRule, U63, U63)), draw(st.booleans()), draw(U63),
    )  # fmt: skip


@given(devices())
def test_a_device_comes_back_whole(device: Device) -> None:
    data = pack_device(device)
    assert unpack_device(device.id, data, {}) == device
    assert summarize_device(data) == summarize(device)
    assert packed_public_key(data) == device.public_key
    assert packed_device_pool(data) == device.pool


@given(pools())
def test_a_pool_comes_back_whole(pool: Pool) -> None:
    data = pack_pool(pool)
    assert unpack_pool(pool.key, data, {}) == pool
    assert pool_due_ms(data) == next_due_ms(pool)


def test_a_public_key_is_read_the_long_way_when_not_where_expected() -> None:
    odd = msgpack.packb([bytes(range(32)), "acme"])  # a shorter list: no array-16 header
    assert packed_public_key(odd) == bytes(range(32))


def test_a_pool_kept_under_another_key_is_refused() -> None:
    data = pack_pool(Pool("a", "acme"))
    with pytest.raises(ValueError, match="kept under"):
        unpack_pool("b", data, {})


def test_equal_strings_are_one_object_across_unpacked_records() -> None:
    control = ControlMessage("a", 1, 5, "throttle", 500, 9, "low_balance")
    names: dict[str, str] = {}
    with_control = Device("a", bytes(32), "acme", "@acme", 0, 5, 5, control=control)
    first = unpack_device("a", pack_device(with_control), names)
    second = unpack_device(
        "b", pack_device(Device("b", bytes(32), "acme", "@acme", 0, 5, 5)), names
    )
    assert first.account is second.account
    assert first.pool is second.pool
    assert first.control is not None
    assert first.created_ms is first.control.time_ms


async def test_the_sqlite_ledger_packs_what_it_stores(tmp_path: Path) -> None:
    control = ControlMessage("a", 3, 7, "block", 0, -5, "exhausted")
    stored = [
        Device("a", bytes(32), "acme", "a", 5, 1, 2, control=control, control_sent=2),
        Device("b", bytes(range(32)), "acme", "@acme", 0, 1, 1, revoked=True),
    ]
    marks = [HighMark("a", 1, "gb", 9), HighMark("a", 0, "api_calls", 4)]
    pools = [Pool("a", "acme", allocation=10, used=5), Pool("@acme", "acme", period_end_ms=50)]
    write = LedgerWrite(devices=stored, pools=pools, highs=marks)
    ledger = SqliteLedger(tmp_path / "l.sqlite3")
    await ledger.open()
    memory = MemoryLedger()
    try:
        await ledger.commit(write)
        await memory.commit(write)
        for source in (ledger, memory):
            packed = await source.load_packed()
            registry = Registry()
            registry.load(packed.devices, packed.pools)
            a = registry.devices["a"]
            assert a.highs == ((0, "api_calls", 4), (1, "gb", 9))  # sorted, from the highs table
            assert a.control == control
            assert a.control_sent == 2
            assert registry.devices["b"].revoked
            assert registry.members_of("@acme") == {"b"}
            assert registry.pools["@acme"] == pools[1]
            assert registry.pools["a"] == pools[0]
            assert registry.due_pools(49) == []
            assert registry.due_pools(50) == ["@acme"]
            assert dict(registry.summaries())["a"].control_unconfirmed
    finally:
        await ledger.close()
