"""The pure core: prices, the charging rule, the throttle ladder, and the batch charger."""

from __future__ import annotations

import random
from dataclasses import replace
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import DEFAULT_LADDER
from gateway.ingest import Pricing, Registry, charge_batch
from gateway.metering import Device, attributed_time, charge, decide_level, next_control
from gateway.pricing import charged, format_price, parse_price, parse_share
from gateway.wire import UsageReport

PRICES = {"api_calls": Fraction(1, 100), "gpu_seconds": Fraction(1, 3), "free": Fraction(0)}


@pytest.mark.parametrize(
    ("text", "price"),
    [("3", Fraction(3)), ("0.01", Fraction(1, 100)), ("1/3", Fraction(1, 3)), ("0", Fraction(0)),
     ("2.50", Fraction(5, 2)), ("7/7", Fraction(1))],
)  # fmt: skip
def test_prices_parse_exactly(text: str, price: Fraction) -> None:
    assert parse_price(text) == price


@pytest.mark.parametrize("text", ["-1", "1e3", "0.1.2", "1/0", "", " 1", "nan", "1/-3", "½"])
def test_bad_prices_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="price"):
        parse_price(text)


def test_shares_and_price_formatting() -> None:
    assert parse_share("20%") == Fraction(1, 5)
    assert parse_share("12.5%") == Fraction(1, 8)
    with pytest.raises(ValueError, match="percentage"):
        parse_share("0.2")
    with pytest.raises(ValueError, match="100%"):
        parse_share("150%")
    assert [format_price(p) for p in (Fraction(1, 100), Fraction(1, 3), Fraction(5))] == [
        "0.01", "1/3", "5",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("units", "price", "tokens"),
    [(0, "0.01", 0), (1, "0.01", 1), (100, "0.01", 1), (101, "0.01", 2), (3, "1/3", 1),
     (4, "1/3", 2), (2**63 - 1, "0.01", 92233720368547759), (2**63 - 1, "1/3", 3074457345618258603),
     (7, "0", 0)],
)  # fmt: skip
def test_charged_is_the_exact_ceiling(units: int, price: str, tokens: int) -> None:
    assert charged(units, parse_price(price)) == tokens


def report(counters: dict[str, int], boot: int = 1, n: int = 1) -> UsageReport:
    return UsageReport("dev-1", boot, n, 1_795_000_000_000, counters)


@pytest.mark.parametrize(
    ("highs", "counters", "lines", "unpriced"),
    [
        ({}, {"api_calls": 150}, [("api_calls", 0, 150, 2)], []),  # first report
        ({"api_calls": 150}, {"api_calls": 250}, [("api_calls", 150, 250, 1)], []),  # advance
        ({"api_calls": 250}, {"api_calls": 250}, [], []),  # duplicate
        ({"api_calls": 250}, {"api_calls": 120}, [], []),  # late or replayed
        ({"api_calls": 100}, {"api_calls": 150}, [("api_calls", 100, 150, 1)], []),
        ({"api_calls": 101}, {"api_calls": 150}, [("api_calls", 101, 150, 0)], []),  # H still rises
        ({}, {"mystery": 10}, [], ["mystery"]),  # unpriced: nothing, H untouched
        ({}, {"mystery": 0}, [], []),
        ({}, {"free": 10}, [("free", 0, 10, 0)], []),
    ],
)
def test_the_charging_rule(
    highs: dict[str, int], counters: dict[str, int], lines: list[tuple[str, int, int, int]],
    unpriced: list[str],
) -> None:  # fmt: skip
    outcome = charge(report(counters), highs, PRICES)
    assert [(x.meter, x.from_units, x.to_units, x.tokens) for x in outcome.lines] == lines
    assert list(outcome.unpriced) == unpriced


def device(allocation: int, used: int = 0, revoked: bool = False) -> Device:
    return Device("dev-1", bytes(32), "acme", allocation, used, 0, 0, revoked)


@pytest.mark.parametrize(
    ("allocation", "used", "state", "rate"),
    [(100, 0, "ok", 1000), (100, 79, "ok", 1000), (100, 80, "throttle", 500),
     (100, 94, "throttle", 500), (100, 95, "throttle", 200), (100, 99, "throttle", 200),
     (100, 100, "block", 0), (100, 130, "block", 0), (0, 0, "block", 0)],
)  # fmt: skip
def test_the_default_throttle_ladder(allocation: int, used: int, state: str, rate: int) -> None:
    level = decide_level(device(allocation, used), DEFAULT_LADDER)
    assert (level.state, level.rate_permille) == (state, rate)


def test_control_messages_are_issued_only_on_a_change_and_number_upwards() -> None:
    first = next_control(device(100), DEFAULT_LADDER, 5, why="provisioned", force=True)
    assert first is not None
    assert (first.seq, first.state, first.why) == (1, "ok", "provisioned")
    same = replace(device(100, 10), control=first)
    assert next_control(same, DEFAULT_LADDER, 6) is None
    low = next_control(replace(same, used=85), DEFAULT_LADDER, 7)
    assert low is not None
    assert (low.seq, low.state, low.rate_permille, low.balance, low.why) == (
        2, "throttle", 500, 15, "low_balance",
    )  # fmt: skip
    revoked = next_control(replace(same, revoked=True), DEFAULT_LADDER, 8)
    assert revoked is not None
    assert (revoked.state, revoked.why) == ("block", "revoked")
    refill = next_control(same, DEFAULT_LADDER, 9, why="refill", force=True)
    assert refill is not None
    assert (refill.seq, refill.state, refill.why) == (2, "ok", "refill")


def test_usage_is_attributed_to_the_device_clock_only_when_plausible() -> None:
    day = 86_400_000
    now = 1_795_000_000_000
    assert attributed_time(now - day, now, 30 * day) == now - day  # an outage: when it happened
    assert attributed_time(now + 60_000, now, 30 * day) == now + 60_000  # small skew
    assert attributed_time(now + 3_600_000, now, 30 * day) == now  # clock ahead: receipt
    assert attributed_time(0, now, 30 * day) == now  # unset clock: receipt


# --- property: no interleaving changes what is charged ------------------------------------


@st.composite
def report_streams(draw: st.DrawFn) -> tuple[list[UsageReport], dict[int, dict[str, int]]]:
    """A device's genuine reports over 1-3 boot epochs, and its final counters per epoch."""
    epochs = draw(st.integers(1, 3))
    stream: list[UsageReport] = []
    final: dict[int, dict[str, int]] = {}
    for boot in range(epochs):
        counters = {"api_calls": 0, "gpu_seconds": 0}
        for n in range(1, draw(st.integers(1, 8)) + 1):
            counters = {m: c + draw(st.integers(0, 700)) for m, c in counters.items()}
            stream.append(UsageReport("dev-1", boot, n, 1_795_000_000_000, dict(counters)))
        final[boot] = counters
    return stream, final


@settings(max_examples=200, deadline=None)
@given(report_streams(), st.randoms(use_true_random=False))
def test_duplicates_replays_reorders_and_losses_never_change_the_charge(
    streams: tuple[list[UsageReport], dict[int, dict[str, int]]], rng: random.Random
) -> None:
    genuine, final = streams
    last_of_epoch = {r.boot: r for r in genuine}
    delivered = [r for r in genuine if rng.random() < 0.7 or r is last_of_epoch[r.boot]]
    delivered += [rng.choice(genuine) for _ in range(rng.randint(0, 10))]  # duplicates, replays
    rng.shuffle(delivered)  # any order
    registry = Registry()
    registry.devices["dev-1"] = device(10**9)
    debited = 0
    while delivered:  # random batch boundaries, committed batch by batch
        size = rng.randint(1, 5)
        batch, delivered = delivered[:size], delivered[size:]
        result = charge_batch(batch, registry, Pricing(PRICES, DEFAULT_LADDER), 1)
        assert all(d.to_units > d.from_units for d in result.write.debits)
        debited += sum(d.tokens for d in result.write.debits)
        registry.apply(result.devices)
    want = sum(charged(c, PRICES[m]) for counters in final.values() for m, c in counters.items())
    assert debited == want
    assert registry.devices["dev-1"].used == want
    for boot, meter, high in registry.devices["dev-1"].highs:
        assert high == final[boot][meter]


def test_charge_batch_never_mutates_the_registry() -> None:
    registry = Registry()
    registry.devices["dev-1"] = device(100)
    before = dict(registry.devices)
    result = charge_batch(
        [report({"api_calls": 9000})], registry, Pricing(PRICES, DEFAULT_LADDER), 1
    )
    assert registry.devices == before
    assert result.devices["dev-1"].used == 90
    assert [c.state for c in result.controls] == ["throttle"]
    assert [e.type for e in result.events] == ["throttle"]
