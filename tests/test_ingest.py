"""From received bytes to decisions: ``verify`` (every rejection reason, in the contract's
order) and ``charge_batch`` (debits, duplicates, unpriced meters, controls and events, all
as values; the registry is left alone). Also the topic parsing and operator views they use."""

from __future__ import annotations

import json
from fractions import Fraction

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from gateway import economics
from gateway.config import DEFAULT_LADDER
from gateway.economics import POLICIES, PeriodRule, Pool, credit
from gateway.errors import Reason, Rejection
from gateway.ingest import (
    Pricing,
    Registry,
    Rejected,
    charge_batch,
    transition_event,
    verify,
)
from gateway.ledger import Debit, HighMark, LedgerWrite
from gateway.metering import Device, next_control
from gateway.packing import pack_device, pack_pool
from gateway.statement import Evidence
from gateway.topics import Topics
from gateway.views import Event, device_state, parse_time, rfc3339, state_json
from gateway.wire import (
    USAGE_DOMAIN,
    ControlMessage,
    UsageReport,
    encode_envelope,
    sign_usage,
    signed_bytes,
)

T = 1_795_000_000_000
NOW = T + 1_000
KEYS = {name: Ed25519PrivateKey.from_private_bytes(bytes([i]) * 32) for i, name in
        enumerate(["dev-1", "dev-2", "gone", "stranger"], start=1)}  # fmt: skip
PRICES = {"api_calls": Fraction(1, 100), "gpu_seconds": Fraction(1, 3)}
PRICING = Pricing(PRICES, DEFAULT_LADDER)


ALLOCATIONS: dict[str, int] = {}


def provisioned(name: str, allocation: int = 1000, **changes: object) -> Device:
    """A device as provisioning leaves it: with its first control message (``ok``)."""
    public = KEYS[name].public_key().public_bytes_raw()
    device = Device(name, public, f"acct-{name}", name, 0, T, T)
    ALLOCATIONS[name] = allocation
    first = next_control(device, pool_of(name), DEFAULT_LADDER, T, why="provisioned", force=True)
    return device._replace(control=first, **changes)  # type: ignore[arg-type]


def pool_of(name: str) -> Pool:
    return credit(Pool(name, f"acct-{name}"), ALLOCATIONS[name], T, kind="initial").pool


def registry(*devices: Device) -> Registry:
    reg = Registry()
    given = {d.id for d in devices}
    defaults = [provisioned(name) for name in ("dev-1", "dev-2") if name not in given]
    if "gone" not in given:
        defaults.append(provisioned("gone", revoked=True))
    everyone = {d.id: d for d in (*defaults, *devices)}
    reg.apply(everyone, [pool_of(name) for name in everyone])
    return reg


def report(
    counters: dict[str, int], device: str = "dev-1", boot: int = 1, n: int = 1
) -> UsageReport:
    return UsageReport(device, boot, n, T, counters)


def envelope(counters: dict[str, int], device: str = "dev-1", key: str | None = None) -> bytes:
    return sign_usage(report(counters, device), KEYS[key or device])


def rejection(outcome: UsageReport | Rejected) -> tuple[str, Reason]:
    assert isinstance(outcome, Rejected)
    return outcome.device, outcome.rejection.reason


# --- verify ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic_id", "shown"),
    [(None, ""), ("", ""), ("+", "+"), ("#", "#"), ("dev+1", "dev+1"), ("dev/1", "dev/1"),
     ("x" * 65, "x" * 64), ("d\u00e9vice", "d\u00e9vice"), ("dev 1", "dev 1"), ("a\n", "a\n")],
)  # fmt: skip
def test_a_bad_topic_id_is_rejected_first(topic_id: str | None, shown: str) -> None:
    """Before the payload is even read; the event shows the id cut to 64 characters."""
    outcome = verify(topic_id, b"junk", registry())
    assert rejection(outcome) == (shown, Reason.BAD_DEVICE_ID)


def test_a_malformed_envelope_is_rejected_before_the_device_is_looked_up() -> None:
    assert rejection(verify("nobody", b"\xc1", registry())) == ("nobody", Reason.MALFORMED)
    oversized = b"\x00" * 5000
    assert rejection(verify("dev-1", oversized, registry())) == ("dev-1", Reason.OVERSIZED)


def test_a_report_for_an_unknown_device_is_rejected() -> None:
    payload = envelope({"api_calls": 1}, device="stranger")
    assert rejection(verify("stranger", payload, registry())) == ("stranger", Reason.UNKNOWN_DEVICE)


def test_a_report_from_a_revoked_device_is_rejected_even_if_genuine() -> None:
    payload = envelope({"api_calls": 1}, device="gone")
    assert rejection(verify("gone", payload, registry())) == ("gone", Reason.REVOKED_DEVICE)


def test_a_report_signed_by_another_key_is_rejected() -> None:
    payload = envelope({"api_calls": 1}, device="dev-1", key="stranger")
    assert rejection(verify("dev-1", payload, registry())) == ("dev-1", Reason.BAD_SIGNATURE)


def test_another_devices_genuine_report_on_this_topic_is_a_bad_signature() -> None:
    """dev-2's own valid report, published on dev-1's topic, cannot charge dev-1."""
    payload = envelope({"api_calls": 1}, device="dev-2")
    assert rejection(verify("dev-1", payload, registry())) == ("dev-1", Reason.BAD_SIGNATURE)


def test_a_device_signing_a_body_naming_another_device_is_a_device_mismatch() -> None:
    payload = envelope({"api_calls": 1}, device="dev-2", key="dev-1")
    outcome = verify("dev-1", payload, registry())
    assert rejection(outcome) == ("dev-1", Reason.DEVICE_MISMATCH)
    assert isinstance(outcome, Rejected)
    assert outcome.rejection.detail == "d=dev-2"


def test_a_genuinely_signed_bad_body_is_rejected_for_what_is_wrong_with_it() -> None:
    body = msgpack.packb({"v": 1, "d": "dev-1", "b": 1, "n": 1, "t": T, "c": {"api_calls": -5}})
    payload = encode_envelope(body, KEYS["dev-1"].sign(signed_bytes(USAGE_DOMAIN, body)))
    assert rejection(verify("dev-1", payload, registry())) == ("dev-1", Reason.OUT_OF_RANGE)


def test_a_genuine_report_on_its_own_topic_is_accepted_and_nothing_changes() -> None:
    reg = registry()
    before = dict(reg.devices)
    assert verify("dev-1", envelope({"api_calls": 7}), reg) == report({"api_calls": 7})
    assert reg.devices == before


# --- charge_batch ---------------------------------------------------------------------------


def test_a_batch_is_charged_in_order_into_one_write_without_touching_the_registry() -> None:
    reg = registry()
    before = dict(reg.devices)
    items = [
        report({"api_calls": 150}),
        report({"api_calls": 250}, n=2),
        report({"gpu_seconds": 4}, device="dev-2"),
        report({"api_calls": 150}),  # a replay
    ]
    result = charge_batch(items, reg, PRICING, NOW)
    assert reg.devices == before
    assert result.write.debits == [
        Debit("dev-1", "acct-dev-1", 1, "api_calls", 0, 150, 2, T, NOW, "dev-1"),
        Debit("dev-1", "acct-dev-1", 1, "api_calls", 150, 250, 1, T, NOW, "dev-1"),
        Debit("dev-2", "acct-dev-2", 1, "gpu_seconds", 0, 4, 2, T, NOW, "dev-2"),
    ]
    assert result.write.highs == [
        HighMark("dev-1", 1, "api_calls", 150),
        HighMark("dev-1", 1, "api_calls", 250),
        HighMark("dev-2", 1, "gpu_seconds", 4),
    ]
    assert (result.charged, result.duplicates, result.tokens) == (3, 1, 5)
    assert sorted(d.id for d in result.write.devices) == ["dev-1", "dev-2"]  # each once
    dev1 = result.devices["dev-1"]
    assert (dev1.used, dev1.last_report_ms, dev1.highs_of(1)) == (3, NOW, {"api_calls": 250})
    assert result.devices["dev-2"].used == 2


def test_a_duplicate_writes_no_debit_but_records_that_the_device_reported() -> None:
    dev = provisioned("dev-1")._replace(used=2, highs=((1, "api_calls", 150),))
    result = charge_batch([report({"api_calls": 150})], registry(dev), PRICING, NOW)
    assert (result.charged, result.duplicates, result.tokens) == (0, 1, 0)
    assert (result.write.debits, result.write.highs, result.controls) == ([], [], [])
    assert result.devices["dev-1"] == dev._replace(last_report_ms=NOW)


def test_usage_is_attributed_to_a_plausible_device_clock_else_to_receipt() -> None:
    late = UsageReport("dev-1", 1, 1, NOW - 86_400_000, {"api_calls": 1})
    broken = UsageReport("dev-1", 2, 1, NOW + 86_400_000, {"api_calls": 1})
    result = charge_batch([late, broken], registry(), PRICING, NOW)
    assert [(d.at_ms, d.received_ms) for d in result.write.debits] == [
        (NOW - 86_400_000, NOW), (NOW, NOW),
    ]  # fmt: skip


def test_rejected_items_become_rejected_events_with_their_reason() -> None:
    items: list[UsageReport | Rejected] = [
        Rejected("dev-1", Rejection(Reason.BAD_SIGNATURE)),
        Rejected("x" * 64, Rejection(Reason.MALFORMED, "ExtraData")),
        report({"api_calls": 100}),
    ]
    result = charge_batch(items, registry(), PRICING, NOW)
    assert result.rejected == items[:2]
    rejected = [e for e in result.events if e.type == "rejected"]
    assert [(e.device, e.details["reason"], e.details["detail"]) for e in rejected] == [
        ("dev-1", "bad_signature", ""), ("x" * 64, "malformed", "ExtraData"),
    ]  # fmt: skip
    assert result.charged == 1


def test_a_device_revoked_or_removed_since_verification_is_rejected_at_charging() -> None:
    reg = registry()
    reg.devices["dev-1"] = reg.devices["dev-1"]._replace(revoked=True)
    del reg.devices["dev-2"]
    items = [report({"api_calls": 100}), report({"api_calls": 100}, device="dev-2")]
    result = charge_batch(items, reg, PRICING, NOW)
    assert [(r.device, r.rejection.reason) for r in result.rejected] == [
        ("dev-1", Reason.REVOKED_DEVICE), ("dev-2", Reason.UNKNOWN_DEVICE),
    ]  # fmt: skip
    assert (result.write.debits, result.devices) == ([], {})


def test_an_unpriced_meter_raises_an_event_debits_nothing_and_leaves_h_alone() -> None:
    result = charge_batch([report({"mystery": 10, "api_calls": 100})], registry(), PRICING, NOW)
    assert [(e.type, e.details) for e in result.events] == [
        ("unpriced_meter", {"meter": "mystery"})
    ]
    assert [d.meter for d in result.write.debits] == ["api_calls"]
    assert result.devices["dev-1"].highs_of(1) == {"api_calls": 100}


def test_once_priced_an_unpriced_meter_charges_its_whole_count() -> None:
    reg = registry()
    first = charge_batch([report({"mystery": 10})], reg, PRICING, NOW)
    assert (first.duplicates, first.write.debits) == (1, [])
    reg.apply(first.devices)
    priced = Pricing({**PRICES, "mystery": Fraction(1)}, DEFAULT_LADDER)
    second = charge_batch([report({"mystery": 12}, n=2)], reg, priced, NOW)
    assert [(d.from_units, d.to_units, d.tokens) for d in second.write.debits] == [(0, 12, 12)]


def test_crossing_thresholds_issues_controls_and_throttle_and_block_events() -> None:
    reg = registry(provisioned("dev-1", 100))
    ok = reg.devices["dev-1"].control
    assert ok is not None
    assert (ok.seq, ok.state) == (1, "ok")
    items = [
        report({"api_calls": 7000}),  # used 70: still ok
        report({"api_calls": 8000}, n=2),  # used 80: 20% left, throttle to 50%
        report({"api_calls": 9500}, n=3),  # used 95: 5% left, throttle to 20%
        report({"api_calls": 9600}, n=4),  # used 96: unchanged level, no message
        report({"api_calls": 10_300}, n=5),  # used 103: block
    ]
    result = charge_batch(items, reg, PRICING, NOW)
    assert [(c.seq, c.state, c.rate_permille, c.balance, c.why) for c in result.controls] == [
        (2, "throttle", 500, 20, "low_balance"),
        (3, "throttle", 200, 5, "low_balance"),
        (4, "block", 0, -3, "exhausted"),
    ]
    assert [(e.type, e.details["from"], e.details["seq"]) for e in result.events] == [
        ("throttle", "ok", 2), ("throttle", "throttle", 3), ("block", "throttle", 4),
    ]  # fmt: skip
    assert result.devices["dev-1"].control == result.controls[-1]
    assert reg.devices["dev-1"].control == ok


def test_a_resume_is_announced_as_such() -> None:
    control = ControlMessage("dev-1", 9, NOW, "ok", 1000, 50, "refill")
    event = transition_event("dev-1", "block", control)
    assert (event.type, event.at_ms) == ("resume", NOW)
    assert event.details == {"from": "block", "state": "ok", "rate_permille": 1000,
                             "balance": 50, "why": "refill", "seq": 9}  # fmt: skip


def test_a_report_that_would_take_used_past_2_to_the_63_is_rejected_not_fatal() -> None:
    """The ledger holds 64-bit integers; a hostile device must not be able to stop charging."""
    pricing = Pricing({"big": Fraction(1), "huge": Fraction(2)}, DEFAULT_LADDER)
    reg = registry()
    at_limit = charge_batch([report({"big": 2**63 - 1})], reg, pricing, NOW)
    assert at_limit.devices["dev-1"].used == 2**63 - 1
    reg.apply(at_limit.devices, at_limit.pools.values())
    past = charge_batch(
        [report({"big": 2**63 - 1, "huge": 1}, n=2), report({"big": 1}, device="dev-2")],
        reg,
        pricing,
        NOW,
    )
    assert [(r.device, r.rejection.reason) for r in past.rejected] == [
        ("dev-1", Reason.OUT_OF_RANGE)
    ]
    assert [d.device for d in past.write.debits] == ["dev-2"]  # everything else goes on
    overflow = charge_batch([report({"huge": 2**63 - 1})], registry(), pricing, NOW)
    assert [r.rejection.reason for r in overflow.rejected] == [Reason.OUT_OF_RANGE]


# --- topics ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "device"),
    [("tokens/v1/devices/dev-1/usage", "dev-1"), ("tokens/v1/devices/a/b/usage", "a/b"),
     ("tokens/v1/devices//usage", ""), ("tokens/v1/devices/dev-1/control", None),
     ("other/v1/devices/dev-1/usage", None), ("tokens/v1/fleet/devices/dev-1", None)],
)  # fmt: skip
def test_the_device_id_of_a_usage_topic_is_read_unvalidated(topic: str, device: str | None) -> None:
    """Validation is verify's job: an id like 'a/b' comes back and is rejected there."""
    assert Topics().device_of_usage(topic) == device


def test_topics_under_a_prefix() -> None:
    topics = Topics("acme/t")
    assert (topics.usage("d"), topics.control("d"), topics.all_usage) == (
        "acme/t/devices/d/usage", "acme/t/devices/d/control", "acme/t/devices/+/usage",
    )  # fmt: skip
    assert (topics.fleet_device("d"), topics.event("block"), topics.all_events) == (
        "acme/t/fleet/devices/d", "acme/t/fleet/events/block", "acme/t/fleet/events/+",
    )  # fmt: skip
    assert topics.device_of_usage(topics.usage("dev-9")) == "dev-9"


def test_a_committed_pool_keeps_the_packed_form_the_ledger_made_of_that_very_pool() -> None:
    reg = registry(provisioned("dev-1"), provisioned("dev-2"))
    one, two = (economics.debit(reg.pools[d], 5)[0] for d in ("dev-1", "dev-2"))
    write = LedgerWrite(pools=[one, two])
    packed = write.packed_pools()
    assert write.packed_pools() is packed  # packed once
    assert {key: data for key, (_, data) in packed.items()} == {
        "dev-1": pack_pool(one), "dev-2": pack_pool(two),
    }  # fmt: skip
    other = two._replace(used=two.used + 1)  # same key, another record: its bytes would lie
    reg.apply({}, [one, other], packed)
    kept = dict(reg.pools.each(packed=lambda data: data, unpacked=lambda pool: pool))
    assert (kept["dev-1"], kept["dev-2"]) == (pack_pool(one), other)
    assert (reg.pools["dev-1"], reg.pools["dev-2"]) == (one, other)


# --- operator views ---------------------------------------------------------------------------


def test_events_and_device_state_are_json_with_rfc3339_times() -> None:
    event = Event("rejected", "dev-1", 1_795_000_000_123, {"reason": "malformed"})
    assert json.loads(event.to_json()) == {
        "type": "rejected", "device": "dev-1", "at": "2026-11-18T11:06:40.123Z",
        "reason": "malformed",
    }  # fmt: skip
    dev = provisioned("dev-1", 100, used=85, last_report_ms=None)
    pool = economics.debit(pool_of("dev-1"), 85)[0]
    state = json.loads(state_json(dev, pool))
    assert state == device_state(dev, pool)
    assert (state["state"], state["rate_permille"], state["balance"], state["used"]) == (
        "ok", 1000, 15, 85,
    )  # fmt: skip
    assert state["last_report_at"] is None
    revoked = json.loads(state_json(dev._replace(revoked=True), pool))
    assert revoked["state"] == "revoked"


IDS = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,20}", fullmatch=True)
MS = st.integers(0, 253_402_300_799_999)  # the times RFC 3339 can write (to 9999-12-31)
TOKENS = st.integers(-(2**63), 2**63 - 1)


@st.composite
def states(draw: st.DrawFn) -> tuple[Device, Pool]:
    """A device and its pool, with any text where the document has text to escape."""
    device_id, account, text = draw(IDS), draw(st.text(max_size=12)), st.text(max_size=12)
    control = None
    if draw(st.booleans()):
        kind = draw(st.sampled_from(["ok", "throttle", "block"]))
        rate = {"ok": 1000, "block": 0}.get(kind, draw(st.integers(1, 999)))
        control = ControlMessage(device_id, draw(MS), draw(MS), kind, rate, draw(TOKENS), "ok")
    period = draw(st.none() | st.builds(PeriodRule, st.just("month"), MS, TOKENS, TOKENS))
    start = draw(MS)
    pool = Pool(
        draw(st.just(device_id) | text.map(lambda a: "@" + a)), account,
        draw(st.sampled_from(POLICIES)), period=period, period_start_ms=start,
        period_end_ms=draw(st.none() | MS), allocation=draw(TOKENS), used=draw(TOKENS),
        overage=draw(TOKENS),
    )  # fmt: skip
    device = Device(
        device_id, draw(st.binary(min_size=32, max_size=32)), account, pool.key, draw(TOKENS),
        draw(MS), draw(MS), draw(st.booleans()), draw(st.none() | MS), control,
        cap=draw(st.none() | TOKENS), period_ms=draw(st.sampled_from([start, start + 1])),
    )  # fmt: skip
    return device, pool


@given(states())
def test_the_state_document_is_the_json_of_the_device_state(state: tuple[Device, Pool]) -> None:
    device, pool = state
    assert (
        state_json(device, pool)
        == json.dumps(device_state(device, pool), separators=(",", ":")).encode()
    )


@pytest.mark.parametrize(
    ("text", "ms"),
    [("2026-11-28T10:00:00Z", 1_795_860_000_000), ("2026-11-28T10:00:00.123Z", 1_795_860_000_123),
     ("2026-11-28T11:00:00.5+01:00", 1_795_860_000_500), ("2026-11-28", 1_795_824_000_000),
     ("2026-11-28T10:00:00", 1_795_860_000_000), ("1795860000123", 1_795_860_000_123),
     ("2004-03-15T08:35:47.472Z", 1_079_339_747_472)],
)  # fmt: skip
def test_times_are_parsed_to_the_exact_millisecond(text: str, ms: int) -> None:
    """Through integers: ``timestamp() * 1000`` is a float, one ms short for some times."""
    assert parse_time(text) == ms


def test_every_millisecond_survives_formatting_and_parsing() -> None:
    for ms in range(1_079_339_747_000, 1_079_339_748_000):
        text = rfc3339(ms)
        assert text is not None
        assert parse_time(text) == ms
    assert rfc3339(None) is None
    assert rfc3339(0) == "1970-01-01T00:00:00.000Z"


def test_the_latest_charging_report_per_device_epoch_and_hour_is_kept_as_evidence() -> None:
    items: list[UsageReport | Rejected] = [
        report({"api_calls": 100}, n=1),
        report({"api_calls": 300}, n=3),
        report({"api_calls": 200}, n=2),  # late: charges nothing, is no evidence
        report({"api_calls": 50}, boot=2, n=1),
        report({"api_calls": 7}, device="dev-2", n=4),
        Rejected("dev-2", Rejection(Reason.MALFORMED)),
    ]
    payloads = [f"payload-{i}".encode() for i in range(len(items))]
    result = charge_batch(items, registry(), PRICING, NOW, payloads)
    hour = T - T % 3_600_000
    assert sorted(result.write.evidence, key=lambda e: (e.device, e.boot)) == [
        Evidence("dev-1", 1, 3, hour, b"payload-1"),
        Evidence("dev-1", 2, 1, hour, b"payload-3"),
        Evidence("dev-2", 1, 4, hour, b"payload-4"),
    ]
    assert charge_batch(items, registry(), PRICING, NOW).write.evidence == []


@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_a_device_moved_to_another_pool_leaves_the_old_one(packed: bool) -> None:
    dev = provisioned("dev-1")._replace(pool="@a")
    reg = Registry()
    if packed:  # as a start-up leaves it: nothing unpacked yet
        reg.load({"dev-1": pack_device(dev)}, {})
    else:
        reg.apply({"dev-1": dev})
    reg.apply({"dev-1": dev._replace(pool="@b")})
    assert (reg.members_of("@a"), reg.members_of("@b")) == (set(), {"dev-1"})
    assert reg.devices["dev-1"].pool == "@b"
