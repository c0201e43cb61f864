"""Fault injection only adds messages (or delays one), so charged totals stay reachable."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_sim.device import SimDevice, make_devices
from device_sim.faults import FaultKind, FaultPlan, Publication
from gateway.errors import Reason, Rejection
from gateway.wire import UsageReport, decode_envelope, decode_usage

DEVICES = make_devices(3, seed=7)
KEYS = {f"t/devices/{d.device_id}/usage": d.public_key for d in DEVICES}
probability = st.sampled_from([0.0, 0.1, 0.5, 1.0]) | st.floats(0.0, 1.0)


def report_stream(order: list[int]) -> list[tuple[str, bytes]]:
    """Genuine reports: device ``i`` advances and reports, for each ``i`` in ``order``."""
    devices = [SimDevice.from_dict(d.to_dict()) for d in DEVICES]  # fresh copies
    stream = []
    for at, index in enumerate(order):
        devices[index].advance(1)
        stream.append((f"t/devices/{devices[index].device_id}/usage", devices[index].report(at)))
    return stream


def undo_adjacent_swaps(sent: list[bytes], genuine: list[bytes]) -> int | None:
    """How many disjoint adjacent swaps turn ``genuine`` into ``sent``; None if none do."""
    i, swaps = 0, 0
    while i < len(genuine):
        if sent[i] == genuine[i]:
            i += 1
        elif i + 1 < len(genuine) and (sent[i], sent[i + 1]) == (genuine[i + 1], genuine[i]):
            i, swaps = i + 2, swaps + 1
        else:
            return None
    return swaps


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    rates=st.fixed_dictionaries({kind.value: probability for kind in FaultKind}),
    order=st.lists(st.integers(0, len(DEVICES) - 1), max_size=30),
)
def test_genuine_reports_all_arrive_and_counts_match(
    seed: int, rates: dict[str, float], order: list[int]
) -> None:
    """Whatever the seed and probabilities: every genuine report is published exactly once,
    each device's reports are at most swapped with their neighbour, and the injected counts
    match what was published."""
    stream = report_stream(order)
    plan = FaultPlan(seed=seed, **rates)
    sent = list(plan.apply(stream))

    assert Counter((p.topic, p.payload) for p in sent if p.genuine) == Counter(stream)
    published = Counter(p.fault for p in sent if not p.genuine)
    for kind in FaultKind:
        if kind is not FaultKind.REORDER:
            assert published[kind] == plan.injected[kind], kind
    for topic in KEYS:
        mine = [payload for t, payload in stream if t == topic]
        swaps = undo_adjacent_swaps(
            [p.payload for p in sent if p.genuine and p.topic == topic], mine
        )
        assert swaps is not None
        assert swaps <= plan.injected[FaultKind.REORDER]
    assert plan.held == 0


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**32), order=st.lists(st.integers(0, len(DEVICES) - 1), max_size=20))
def test_injected_messages_are_what_they_claim(seed: int, order: list[int]) -> None:
    """Duplicates and replays are genuine payloads of the same device; forged ones fail the
    signature; impersonations are another device's valid report; junk is not msgpack."""
    stream = report_stream(order)
    plan = FaultPlan(seed=seed, **{kind.value: 0.5 for kind in FaultKind})
    for publication in plan.apply(stream):
        check_injected(publication, set(stream))


def check_injected(publication: Publication, genuine: set[tuple[str, bytes]]) -> None:
    topic, payload, key = publication.topic, publication.payload, KEYS[publication.topic]
    if publication.fault in (FaultKind.DUPLICATE, FaultKind.REPLAY):
        assert (topic, payload) in genuine
    elif publication.fault is FaultKind.FORGE:
        decoded = decode_usage(payload, key)
        assert isinstance(decoded, Rejection)
        assert decoded.reason is Reason.BAD_SIGNATURE
    elif publication.fault is FaultKind.IMPERSONATE:
        owner = next(
            t for t, k in KEYS.items() if isinstance(decode_usage(payload, k), UsageReport)
        )
        assert owner != topic
    elif publication.fault is FaultKind.MALFORMED:
        decoded_envelope = decode_envelope(payload)
        assert isinstance(decoded_envelope, Rejection)
        assert decoded_envelope.reason is Reason.MALFORMED


def test_no_faults_passes_the_stream_through_unchanged() -> None:
    stream = report_stream([0, 1, 2, 0, 1, 2])
    assert [(p.topic, p.payload) for p in FaultPlan(seed=3).apply(stream)] == stream


def test_reorder_sends_a_held_report_after_the_devices_next_one() -> None:
    (first_topic, first), (_, second) = report_stream([0, 0])
    plan = FaultPlan(reorder=1.0)
    assert plan.process(first_topic, first) == []
    assert plan.held == 1
    assert [p.payload for p in plan.process(first_topic, second)] == [second, first]
    assert plan.injected[FaultKind.REORDER] == 1


def test_faults_with_nothing_to_work_on_are_skipped_and_not_counted() -> None:
    """The very first report has no earlier one to replay and no other device to lend one."""
    plan = FaultPlan(replay=1.0, impersonate=1.0)
    ((topic, payload),) = report_stream([0])
    assert plan.process(topic, payload) == [Publication(topic, payload)]
    assert plan.injected[FaultKind.REPLAY] == plan.injected[FaultKind.IMPERSONATE] == 0


def test_same_seed_same_faults() -> None:
    stream = report_stream([0, 1, 2] * 5)
    rates = {kind.value: 0.3 for kind in FaultKind}
    runs = [list(FaultPlan(seed=11, **rates).apply(stream)) for _ in range(2)]
    assert runs[0] == runs[1]


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_probabilities_outside_zero_to_one_are_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="duplicate probability"):
        FaultPlan(duplicate=bad)
