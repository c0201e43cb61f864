"""Charging batch N+1 while batch N commits (``Staged``) decides exactly what charging
them one after the other against committed state decides, whatever the batches, the
order in which commits complete relative to charging, and however the batches split.

Sequential reference: charge a batch against the registry, apply it, charge the next.
Pipelined: charge each batch against ``Staged`` (committed + staged), stage it, and
commit (apply + unstage) the oldest staged batch at points hypothesis chooses."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.economics import Pool, credit, shared_pool_key
from gateway.ingest import BatchResult, Layered, Registry, Staged, charge_batch
from gateway.metering import Device
from gateway.wire import UsageReport
from tests.test_ingest import PRICING, T, provisioned

DEVICES = ("dev-1", "dev-2")


def fresh_registry(allocation: int, shared: bool) -> Registry:
    """Two devices with 'allocation' tokens each, or sharing one pool of twice that."""
    reg = Registry()
    devices = [provisioned(name, allocation) for name in DEVICES]
    if shared:
        key = shared_pool_key("acme")
        pool = credit(Pool(key, "acme"), 2 * allocation, T, kind="initial").pool
        devices = [d._replace(account="acme", pool=key) for d in devices]
        reg.apply({d.id: d for d in devices}, [pool])
    else:
        pools = [credit(Pool(d.id, d.account), allocation, T, kind="initial").pool for d in devices]
        reg.apply({d.id: d for d in devices}, pools)
    return reg


reports = st.lists(
    st.tuples(st.sampled_from(DEVICES), st.integers(1, 2), st.integers(0, 3_000)),
    min_size=1,
    max_size=30,
)


def as_reports(raw: list[tuple[str, int, int]]) -> list[UsageReport]:
    return [
        UsageReport(device, boot, n, T, {"api_calls": count})
        for n, (device, boot, count) in enumerate(raw, start=1)
    ]


def split(items: list[UsageReport], cuts: list[int]) -> list[list[UsageReport]]:
    points = sorted({c % (len(items) + 1) for c in cuts} | {0, len(items)})
    return [items[a:b] for a, b in itertools.pairwise(points) if b > a]


def snapshot(reg: Registry) -> tuple[dict[str, Device], dict[str, Pool]]:
    return dict(reg.devices), dict(reg.pools)


@settings(max_examples=300, deadline=None)
@given(
    raw=reports,
    cuts=st.lists(st.integers(0, 30), max_size=6),
    commit_after=st.lists(st.booleans(), min_size=8, max_size=8),
    allocation=st.integers(1, 40),
    shared=st.booleans(),
)
def test_pipelined_charging_decides_what_sequential_charging_decides(
    raw: list[tuple[str, int, int]],
    cuts: list[int],
    commit_after: list[bool],
    allocation: int,
    shared: bool,
) -> None:
    batches = split(as_reports(raw), cuts)
    sequential = fresh_registry(allocation, shared)
    expected: list[BatchResult] = []
    for index, batch in enumerate(batches):
        result = charge_batch(batch, sequential, PRICING, T + index)
        sequential.apply(result.devices, result.pools.values())
        expected.append(result)

    committed = fresh_registry(allocation, shared)
    staged = Staged(committed)
    in_flight: list[BatchResult] = []
    got: list[BatchResult] = []

    def commit_oldest() -> None:
        oldest = in_flight.pop(0)
        committed.apply(oldest.devices, oldest.pools.values())
        staged.unstage(oldest)

    for index, batch in enumerate(batches):
        result = charge_batch(batch, staged, PRICING, T + index)
        staged.stage(result)
        in_flight.append(result)
        got.append(result)
        if commit_after[index % len(commit_after)]:
            commit_oldest()
    while in_flight:
        commit_oldest()

    assert [r.write for r in got] == [r.write for r in expected]
    assert [r.controls for r in got] == [r.controls for r in expected]
    assert [r.events for r in got] == [r.events for r in expected]
    assert snapshot(committed) == snapshot(sequential)
    assert staged.batches == 0
    assert staged.devices.top == {}
    assert staged.pools.top == {}


def test_unstaging_keeps_a_value_a_later_batch_staged() -> None:
    committed = fresh_registry(100, shared=False)
    staged = Staged(committed)
    first = charge_batch(as_reports([("dev-1", 1, 500)]), staged, PRICING, T)
    staged.stage(first)
    second = charge_batch(
        [UsageReport("dev-1", 1, 2, T, {"api_calls": 900})], staged, PRICING, T + 1
    )
    staged.stage(second)
    committed.apply(first.devices, first.pools.values())
    staged.unstage(first)
    assert staged.devices["dev-1"] is second.devices["dev-1"]  # not the committed one
    assert staged.devices["dev-1"].highs == ((1, "api_calls", 900),)
    assert committed.devices["dev-1"].highs == ((1, "api_calls", 500),)


def test_a_layered_mapping_reads_top_then_base() -> None:
    layered: Layered[int] = Layered({"a": 1, "b": 2})
    layered.top["b"] = 20
    layered.top["c"] = 30
    assert (layered["a"], layered["b"], layered.get("c"), layered.get("z")) == (1, 20, 30, None)
    assert "c" in layered
    assert "z" not in layered
    assert sorted(layered) == ["a", "b", "c"]
    assert len(layered) == 3
    assert dict(layered) == {"a": 1, "b": 20, "c": 30}
