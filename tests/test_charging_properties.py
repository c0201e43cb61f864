"""Properties (hypothesis) of charging and decoding.

* No interleaving of duplicates, replays, reorders and losses of a device's genuine reports,
  cut into batches anywhere, changes what is charged: exactly ``charged(final count)`` per
  boot epoch and meter (contract §4), as long as each epoch's final report arrives (a lost
  final report is made good by the device re-publishing it on reconnect).
* After every batch, every device on a shared pool was told its current level.
* Junk bytes only ever decode to a rejection; the decoders and ``ingest.verify`` never raise;
  the envelope's fast path decides exactly as the strict decoder.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from fractions import Fraction
from typing import Any

import msgpack
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway import wire
from gateway.config import DEFAULT_LADDER
from gateway.economics import Pool, credit
from gateway.errors import Rejection
from gateway.ingest import Pricing, Registry, Rejected, charge_batch, verify
from gateway.ledger import MemoryLedger
from gateway.metering import Device, decide_level
from gateway.pricing import charged
from gateway.wire import (
    CONTROL_DOMAIN,
    USAGE_DOMAIN,
    ControlMessage,
    UsageReport,
    decode_control,
    decode_envelope,
    decode_usage,
    decode_usage_body,
    encode_envelope,
    sign_usage,
    signed_bytes,
)

PRICES = {
    "api_calls": Fraction(1, 100),
    "gpu_seconds": Fraction(1, 3),
    "frames": Fraction(7, 9),
    "bytes_out": Fraction(2, 3),
}
METERS = [*PRICES, "unpriced"]
T = 1_795_000_000_000
PROPERTY = settings(max_examples=200, deadline=None)

Stream = tuple[list[UsageReport], dict[tuple[int, str], int]]


@st.composite
def genuine_streams(draw: st.DrawFn) -> Stream:
    """A device's genuine reports over 1-4 boot epochs (numbers need not be consecutive),
    and the final count per (epoch, meter). Within an epoch counters only grow; a meter
    may start being reported part-way through."""
    boots = sorted(draw(st.sets(st.integers(0, 2**63 - 1), min_size=1, max_size=4)))
    stream: list[UsageReport] = []
    final: dict[tuple[int, str], int] = {}
    for boot in boots:
        counters: dict[str, int] = {}
        for n in range(1, draw(st.integers(1, 8)) + 1):
            for meter in draw(st.lists(st.sampled_from(METERS), min_size=1, max_size=3)):
                step = draw(st.one_of(st.integers(0, 1000), st.integers(0, 2**40)))
                counters[meter] = counters.get(meter, 0) + step
            stream.append(UsageReport("dev-1", boot, n, T + n, dict(counters)))
        final.update(((boot, meter), count) for meter, count in counters.items())
    return stream, final


@st.composite
def deliveries(draw: st.DrawFn, genuine: list[UsageReport]) -> list[list[UsageReport]]:
    """What reaches the gateway, in batches: any subset keeping each epoch's last report,
    plus duplicates and replays, in any order, cut anywhere."""
    last = {report.boot: index for index, report in enumerate(genuine)}
    kept = [
        report
        for index, report in enumerate(genuine)
        if index in last.values() or draw(st.booleans())
    ]
    replays = draw(st.lists(st.sampled_from(genuine), max_size=12))
    delivered = draw(st.permutations(kept + replays))
    batches: list[list[UsageReport]] = []
    while delivered:
        size = draw(st.integers(1, max(1, len(delivered))))
        batches.append(delivered[:size])
        delivered = delivered[size:]
    return batches


@PROPERTY
@given(st.data(), genuine_streams(), st.sampled_from([10**18, 1000, 50, 0]))
def test_no_interleaving_of_duplicates_replays_reorders_or_losses_changes_the_charge(
    data: st.DataObject, stream: Stream, allocation: int
) -> None:
    genuine, final = stream
    batches = data.draw(deliveries(genuine))
    registry = Registry()
    registry.apply(
        {"dev-1": Device("dev-1", bytes(32), "acme", "dev-1", 0, 0, 0)},
        [credit(Pool("dev-1", "acme"), allocation, 0).pool],
    )
    pricing = Pricing(PRICES, DEFAULT_LADDER)
    ledger = MemoryLedger()
    highest = max_reported(genuine)
    controls: list[ControlMessage] = []

    async def run() -> None:
        for number, batch in enumerate(batches):
            before = dict(registry.devices)
            result = charge_batch(batch, registry, pricing, T + number)
            assert registry.devices == before  # charge_batch decides; it changes nothing
            assert not result.rejected
            await ledger.commit(result.write)
            registry.apply(result.devices, result.pools.values())
            controls.extend(result.controls)
            for boot, meter, high in registry.devices["dev-1"].highs:
                assert high <= highest[boot, meter]

    asyncio.run(run())

    want = sum(charged(count, PRICES[m]) for (_, m), count in final.items() if m in PRICES)
    debits = ledger.debits
    assert all(d.to_units > d.from_units and d.tokens >= 0 for d in debits)
    assert sum(d.tokens for d in debits) == want
    assert registry.devices["dev-1"].used == want
    assert registry.pools["dev-1"].used == want
    assert asyncio.run(ledger.totals("dev-1")) == (0, want)
    units: dict[tuple[int, str], int] = defaultdict(int)
    for d in debits:
        units[d.boot, d.meter] += d.to_units - d.from_units  # contiguous: no unit twice
    priced_final = {key: count for key, count in final.items() if key[1] in PRICES and count}
    assert dict(units) == priced_final
    assert {(b, m): h for b, m, h in registry.devices["dev-1"].highs} == priced_final
    stored = {(h.boot, h.meter): h.high for h in asyncio.run(ledger.load()).highs}
    assert stored == priced_final
    assert [c.seq for c in controls] == sorted({c.seq for c in controls})  # strictly increasing


@st.composite
def shared_pool_traffic(draw: st.DrawFn) -> list[list[UsageReport]]:
    """Reports of three devices on one shared pool, each device's counter only growing,
    interleaved in any order and cut into batches anywhere."""
    reports: list[UsageReport] = []
    for device in SHARED_DEVICES:
        count = 0
        for n in range(1, draw(st.integers(0, 6)) + 1):
            count += draw(st.integers(0, 3000))
            reports.append(UsageReport(device, 1, n, T + n, {"api_calls": count}))
    delivered = draw(st.permutations(reports))
    batches: list[list[UsageReport]] = []
    while delivered:
        size = draw(st.integers(1, len(delivered)))
        batches.append(delivered[:size])
        delivered = delivered[size:]
    return batches


SHARED_DEVICES = ("dev-a", "dev-b", "dev-c")


@PROPERTY
@given(shared_pool_traffic(), st.sampled_from([10**6, 100, 40, 5]), st.sampled_from([None, 12]))
def test_after_every_batch_every_device_on_a_pool_was_told_its_current_level(
    batches: list[list[UsageReport]], allocation: int, cap: int | None
) -> None:
    registry = Registry()
    registry.apply(
        {
            device: Device(device, bytes(32), "acme", "@acme", 0, 0, 0, cap=cap if i == 0 else None)
            for i, device in enumerate(SHARED_DEVICES)
        },
        [credit(Pool("@acme", "acme"), allocation, 0).pool],
    )
    pricing = Pricing(PRICES, DEFAULT_LADDER)
    for number, batch in enumerate(batches):
        result = charge_batch(batch, registry, pricing, T + number)
        registry.apply(result.devices, result.pools.values())
        pool = registry.pools["@acme"]
        for device_id in SHARED_DEVICES:
            device = registry.devices[device_id]
            told = device.control
            level = decide_level(device, pool, DEFAULT_LADDER)
            assert ((told.state, told.rate_permille) if told else ("ok", 1000)) == level.key


def max_reported(genuine: list[UsageReport]) -> dict[tuple[int, str], int]:
    highest: dict[tuple[int, str], int] = defaultdict(int)
    for report in genuine:
        for meter, count in report.counters.items():
            highest[report.boot, meter] = max(highest[report.boot, meter], count)
    return highest


# --- junk in, rejection out ----------------------------------------------------------------

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
PUBLIC = KEY.public_key()
OTHER = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
REPORT = UsageReport("dev-1", 1, 1, T, {"api_calls": 42, "gpu_seconds": 7})
GOOD = sign_usage(REPORT, KEY)


@st.composite
def mutations(draw: st.DrawFn, original: bytes = GOOD) -> bytes:
    """A valid envelope with bits flipped, bytes cut, inserted or replaced, or truncated."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "replace", "truncate"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "cut":
            del data[at : at + draw(st.integers(1, 8))]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "truncate":
            del data[at:]
        elif data:
            data[at] = draw(st.integers(0, 255))
    return bytes(data)


junk = st.one_of(st.binary(max_size=5000), mutations())


@PROPERTY
@given(junk)
def test_any_bytes_decode_to_a_rejection_or_to_the_one_genuine_report(payload: bytes) -> None:
    outcome = decode_usage(payload, PUBLIC)
    if isinstance(outcome, UsageReport):
        # Only the signed body can verify (a mutation may re-frame it, never change it).
        envelope = decode_envelope(payload)
        assert not isinstance(envelope, Rejection)
        assert envelope.verify(USAGE_DOMAIN, PUBLIC)
        assert outcome == REPORT
    else:
        assert isinstance(outcome, Rejection)
    assert isinstance(decode_control(payload, PUBLIC), Rejection)  # never a control message
    assert isinstance(decode_usage_body(payload), UsageReport | Rejection)


def _strict_envelope(payload: bytes) -> object:
    """What decode_envelope says with no fast path: the strict decoder, then the shape."""
    try:
        return wire._envelope(wire._unpack(payload))
    except wire.InvalidMessage as exc:
        return exc.rejection


KEYS = [b"\xa1m", b"\xa1s", b"\xa1x", b"\x01"]
SIGNATURE_BIN = b"\xc4\x40" + bytes(64)
VALUES = [
    b"\xc4\x01\x00",
    SIGNATURE_BIN,
    b"\xd6\xff\x00\x00\x00\x01",
    b"\x81\xa1m\x01",
    b"\xc1",
]


@st.composite
def small_maps(draw: st.DrawFn) -> bytes:
    """Maps of a few entries (keys m, s and others, duplicates too; bin, timestamp, map or
    invalid values), the header's count sometimes wrong, sometimes trailing bytes."""
    pairs = draw(st.lists(st.tuples(st.sampled_from(KEYS), st.sampled_from(VALUES)), max_size=3))
    count = len(pairs) + draw(st.sampled_from([0, 0, 0, -1, 1]))
    body = b"".join(key + value for key, value in pairs)
    return bytes([0x80 | max(count, 0)]) + body + draw(st.sampled_from([b"", b"\x00"]))


@PROPERTY
@given(st.one_of(junk, small_maps()))
@example(b"\x83\xa1m\xc4\x01\x00\xa1m\xc4\x01\x01\xa1s" + SIGNATURE_BIN)  # m twice
@example(b"\x82\xa1m\xc4\x01\x00\xa1s" + SIGNATURE_BIN + b"\x00")  # trailing bytes
@example(b"\x82\xa1m\xd6\xff\x00\x00\x00\x01\xa1s" + SIGNATURE_BIN)  # a timestamp
@example(b"\x82\xa1m\xc4\x01\x00\xa1s" + SIGNATURE_BIN)  # well formed
def test_the_envelope_fast_path_decides_exactly_as_the_strict_decoder(payload: bytes) -> None:
    assert decode_envelope(payload) == _strict_envelope(payload)


msgpack_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**64 - 1),
        st.floats(),
        st.text(max_size=40),
        st.binary(max_size=40),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.dictionaries(
            st.one_of(st.text(max_size=33), st.sampled_from("vdbntc")), inner, max_size=8
        ),
    ),
    max_leaves=30,
)
counts = st.one_of(
    st.integers(0, 2**63 - 1), st.sampled_from([-1, 2**63, 2**64 - 1]), msgpack_values
)
meter_names = st.one_of(st.from_regex(r"[a-z0-9_]{1,32}", fullmatch=True), st.text(max_size=34))


@st.composite
def body_maps(draw: st.DrawFn) -> dict[str, Any]:
    """A usage body close to valid: up to two fields dropped or replaced by anything, any
    meters and counts, unknown keys (which may also clobber known ones)."""
    fields: dict[str, Any] = {
        "v": 1,
        "d": "dev-1",
        "b": draw(st.integers(0, 2**63 - 1)),
        "n": draw(st.integers(0, 2**63 - 1)),
        "t": draw(st.integers(0, 2**63 - 1)),
        "c": draw(st.dictionaries(meter_names, counts, max_size=66)),
    }
    for key in draw(st.lists(st.sampled_from("vdbntc"), max_size=2, unique=True)):
        if draw(st.booleans()):
            del fields[key]
        else:
            fields[key] = draw(msgpack_values)
    fields.update(draw(st.dictionaries(st.text(max_size=3), msgpack_values, max_size=2)))
    return fields


@PROPERTY
@given(st.one_of(body_maps(), msgpack_values))
def test_a_genuinely_signed_body_of_any_shape_gives_a_rejection_or_an_in_range_report(
    value: Any,
) -> None:
    body = msgpack.packb(value, use_bin_type=True)
    payload = encode_envelope(body, KEY.sign(signed_bytes(USAGE_DOMAIN, body)))
    outcome = decode_usage(payload, PUBLIC)
    if isinstance(outcome, Rejection):
        return
    assert isinstance(outcome, UsageReport)  # and so, by construction, in range
    assert (outcome.device, outcome.boot, outcome.number) == (value["d"], value["b"], value["n"])
    assert dict(outcome.counters) == value["c"]
    assert all(0 <= count < 2**63 for count in outcome.counters.values())


REGISTRY = Registry()
REGISTRY.apply(
    {
        "dev-1": Device("dev-1", PUBLIC.public_bytes_raw(), "acme", "dev-1", 0, 0, 0),
        "gone": Device(
            "gone", OTHER.public_key().public_bytes_raw(), "acme", "gone", 0, 0, 0, revoked=True
        ),
    },
    [credit(Pool(name, "acme"), 10, 0).pool for name in ("dev-1", "gone")],
)
topic_ids = st.one_of(
    st.none(),
    st.sampled_from(["dev-1", "gone", "nobody", "", "+", "#", "dev-1/usage", "x" * 65]),
    st.text(max_size=80),
)
payloads = st.one_of(
    junk,
    st.just(GOOD),
    st.just(sign_usage(UsageReport("gone", 1, 1, T, {"a": 1}), OTHER)),
    st.just(encode_envelope(b"\x80", KEY.sign(signed_bytes(CONTROL_DOMAIN, b"\x80")))),
)


@PROPERTY
@given(payloads, topic_ids)
def test_verify_never_raises_and_accepts_only_a_genuine_report_on_its_own_topic(
    payload: bytes, topic_id: str | None
) -> None:
    outcome = verify(topic_id, payload, REGISTRY)
    if isinstance(outcome, UsageReport):
        assert topic_id == "dev-1"
        assert outcome == REPORT
    else:
        assert isinstance(outcome, Rejected)
        assert len(outcome.device) <= 64
