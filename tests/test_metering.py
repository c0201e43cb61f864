"""The pure metering core: the charging rule (contract §4), the throttle ladder and control
numbering (§5, §9), and when usage counts as having happened. Decisions are values;
inputs are never changed."""

from __future__ import annotations

from fractions import Fraction

import pytest

from gateway import economics
from gateway.config import DEFAULT_LADDER, ThrottleStep
from gateway.economics import Pool
from gateway.metering import (
    Charge,
    ChargeLine,
    Device,
    attributed_time,
    charge,
    debit,
    decide_level,
    device_balance,
    next_control,
    raised_highs,
    used_now,
)
from gateway.wire import ControlMessage, UsageReport

PRICES = {
    "api_calls": Fraction(1, 100),
    "gpu_seconds": Fraction(1, 3),
    "bytes_out": Fraction(1, 1000),
    "free": Fraction(0),
}
T = 1_795_000_000_000
DAY = 86_400_000


def report(counters: dict[str, int], boot: int = 1, n: int = 1) -> UsageReport:
    return UsageReport("dev-1", boot, n, T, counters)


def lines(outcome: Charge) -> list[tuple[str, int, int, int]]:
    return [(x.meter, x.from_units, x.to_units, x.tokens) for x in outcome.lines]


# --- the charging rule ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("highs", "counters", "want", "unpriced"),
    [
        pytest.param({}, {"api_calls": 150}, [("api_calls", 0, 150, 2)], [], id="first report"),
        pytest.param({"api_calls": 150}, {"api_calls": 250}, [("api_calls", 150, 250, 1)], [],
                     id="increase: charged(250) - charged(150)"),
        pytest.param({"api_calls": 250}, {"api_calls": 250}, [], [], id="duplicate"),
        pytest.param({"api_calls": 250}, {"api_calls": 120}, [], [], id="decrease: late or replay"),
        pytest.param({"api_calls": 250}, {"api_calls": 0}, [], [], id="decrease to zero"),
        pytest.param({"api_calls": 101}, {"api_calls": 150}, [("api_calls", 101, 150, 0)], [],
                     id="zero-token advance still raises H"),
        pytest.param({}, {"gpu_seconds": 1}, [("gpu_seconds", 0, 1, 1)], [], id="1/3: first unit"),
        pytest.param({"gpu_seconds": 1}, {"gpu_seconds": 3}, [("gpu_seconds", 1, 3, 0)], [],
                     id="1/3: units 2 and 3 are already paid"),
        pytest.param({"gpu_seconds": 3}, {"gpu_seconds": 4}, [("gpu_seconds", 3, 4, 1)], [],
                     id="1/3: unit 4 starts a token"),
        pytest.param({}, {"mystery": 10}, [], ["mystery"], id="unpriced: no debit, H untouched"),
        pytest.param({}, {"mystery": 0}, [], [], id="unpriced at zero: nothing to say"),
        pytest.param({"mystery": 5}, {"mystery": 10}, [], ["mystery"],
                     id="unpriced ignores an H it somehow has"),
        pytest.param({}, {"free": 10}, [("free", 0, 10, 0)], [], id="a zero price raises H"),
        pytest.param({}, {"api_calls": 2**63 - 1}, [("api_calls", 0, 2**63 - 1, 92233720368547759)],
                     [], id="the largest counter"),
        pytest.param({"api_calls": 100, "gpu_seconds": 9},
                     {"gpu_seconds": 12, "mystery": 1, "api_calls": 100, "bytes_out": 1},
                     [("bytes_out", 0, 1, 1), ("gpu_seconds", 9, 12, 1)], ["mystery"],
                     id="several meters: each by its own H, lines sorted by meter"),
    ],
)  # fmt: skip
def test_the_charging_rule(
    highs: dict[str, int],
    counters: dict[str, int],
    want: list[tuple[str, int, int, int]],
    unpriced: list[str],
) -> None:
    before = dict(highs)
    outcome = charge(report(counters), highs, PRICES)
    assert lines(outcome) == want
    assert list(outcome.unpriced) == unpriced
    assert outcome.tokens == sum(tokens for *_, tokens in want)
    assert highs == before  # a decision, not a mutation


def test_a_charge_with_no_lines_is_a_duplicate_costing_nothing() -> None:
    assert Charge(()).tokens == 0
    assert Charge((ChargeLine("a", 0, 1, 2), ChargeLine("b", 5, 9, 3))).tokens == 5


def test_charging_in_many_small_reports_costs_what_one_big_report_costs() -> None:
    """Rounding never drifts: 300 reports of one gpu_second each cost ceil(300/3) = 100."""
    highs: dict[str, int] = {}
    total = 0
    for count in range(1, 301):
        outcome = charge(report({"gpu_seconds": count}, n=count), highs, PRICES)
        total += outcome.tokens
        highs = {line.meter: line.to_units for line in outcome.lines} or highs
    assert total == 100 == charge(report({"gpu_seconds": 300}), {}, PRICES).tokens


# --- H per boot epoch -------------------------------------------------------------------------


def pool(allocation: int = 100, used: int = 0) -> Pool:
    """A prepaid dedicated pool granted ``allocation`` and debited ``used``."""
    granted = economics.credit(Pool("dev-1", "acme"), allocation, 0, kind="initial").pool
    return economics.debit(granted, used)[0]


def device(
    allocation: int = 100, used: int = 0, *, revoked: bool = False, control: bool = False
) -> Device:
    dev = Device("dev-1", bytes(32), "acme", "dev-1", used, 0, 0, revoked)
    if control:
        level = decide_level(dev, pool(allocation, used), DEFAULT_LADDER)
        message = ControlMessage("dev-1", 7, 0, level.state, level.rate_permille, 0, level.why)
        dev = dev._replace(control=message)
    return dev


def test_highs_are_kept_per_boot_epoch_and_raised_one_epoch_at_a_time() -> None:
    first = device()
    dev = first._replace(highs=raised_highs(first, 2, {"b_meter": 5, "a_meter": 9}))
    dev = dev._replace(highs=raised_highs(dev, 1, {"a_meter": 3}))
    assert dev.highs == ((1, "a_meter", 3), (2, "a_meter", 9), (2, "b_meter", 5))  # sorted
    raised = dev._replace(highs=raised_highs(dev, 2, {"a_meter": 12}))
    assert raised.highs_of(2) == {"a_meter": 12, "b_meter": 5}
    assert raised.highs_of(1) == {"a_meter": 3}
    assert raised.highs_of(3) == {}
    assert dev.highs_of(2) == {"a_meter": 9, "b_meter": 5}  # the input is unchanged


def test_debit_returns_a_new_record_counting_in_the_pools_period() -> None:
    dev = device(100, 10)
    debited = debit(dev, pool(100, 17), 7, T)
    assert (debited.used, debited.last_report_ms, debited.updated_ms) == (17, T, T)
    assert device_balance(debited, pool(100, 17)) == 83
    assert dev.used == 10
    next_period = pool(100, 17)._replace(period_start_ms=T + 1)
    assert used_now(debited, next_period) == 0  # a new period: the old count is stale
    assert debit(debited, next_period, 3, T + 2).used == 3


def test_a_cap_binds_before_the_pool() -> None:
    capped = device(100, 0)._replace(pool="@acme", cap=30, used=29)
    shared = pool(1000, 29)
    assert device_balance(capped, shared) == 1
    level = decide_level(capped, shared, DEFAULT_LADDER)
    assert (level.state, level.rate_permille) == ("throttle", 200)  # 1 of 30 is under 5%
    blocked = decide_level(capped._replace(used=30), pool(1000, 30), DEFAULT_LADDER)
    assert (blocked.state, blocked.why) == ("block", "cap_reached")


# --- the throttle ladder ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("allocation", "used", "state", "rate", "why"),
    [
        pytest.param(100, 0, "ok", 1000, "ok", id="full"),
        pytest.param(100, 79, "ok", 1000, "ok", id="21% left"),
        pytest.param(100, 80, "throttle", 500, "low_balance", id="exactly 20% left"),
        pytest.param(100, 94, "throttle", 500, "low_balance", id="6% left"),
        pytest.param(100, 95, "throttle", 200, "low_balance", id="exactly 5% left"),
        pytest.param(100, 99, "throttle", 200, "low_balance", id="1% left"),
        pytest.param(100, 100, "block", 0, "exhausted", id="exactly 0 left"),
        pytest.param(100, 130, "block", 0, "exhausted", id="negative balance"),
        pytest.param(0, 0, "block", 0, "exhausted", id="zero allocation"),
        pytest.param(1000, 800, "throttle", 500, "low_balance", id="200 of 1000"),
        pytest.param(1000, 799, "ok", 1000, "ok", id="201 of 1000"),
        pytest.param(3, 2, "ok", 1000, "ok", id="1 of 3 is above 20%"),
        pytest.param(30, 28, "throttle", 500, "low_balance", id="2 of 30 is above 5% (1.5)"),
        pytest.param(30, 29, "throttle", 200, "low_balance", id="1 of 30 is under 5% (1.5)"),
        pytest.param(2**62, 2**62 - 1, "throttle", 200, "low_balance", id="huge allocation"),
    ],
)
def test_the_default_ladder(allocation: int, used: int, state: str, rate: int, why: str) -> None:
    level = decide_level(device(allocation, used), pool(allocation, used), DEFAULT_LADDER)
    assert (level.state, level.rate_permille, level.why) == (state, rate, why)


def test_a_revoked_device_is_blocked_whatever_its_balance() -> None:
    level = decide_level(device(100, 0, revoked=True), pool(100, 0), DEFAULT_LADDER)
    assert (level.state, level.rate_permille, level.why) == ("block", 0, "revoked")


@pytest.mark.parametrize("used", [0, 50, 80, 85, 95, 99, 100])
def test_the_ladder_does_not_depend_on_the_order_of_its_steps(used: int) -> None:
    dev, own = device(100, used), pool(100, used)
    reverse = tuple(reversed(DEFAULT_LADDER))
    assert decide_level(dev, own, reverse) == decide_level(dev, own, DEFAULT_LADDER)


def test_an_empty_ladder_runs_at_full_rate_until_the_balance_is_gone() -> None:
    assert decide_level(device(100, 99), pool(100, 99), ()).state == "ok"
    assert decide_level(device(100, 100), pool(100, 100), ()).state == "block"


def test_a_custom_ladder_picks_the_lowest_step_reached() -> None:
    ladder = (
        ThrottleStep(Fraction(1, 2), 900),
        ThrottleStep(Fraction(1, 4), 600),
        ThrottleStep(Fraction(1, 10), 100),
    )
    rates = [
        decide_level(device(100, used), pool(100, used), ladder).rate_permille
        for used in (49, 50, 75, 90)
    ]
    assert rates == [1000, 900, 600, 100]


# --- control messages ---------------------------------------------------------------------------


def test_the_first_control_message_is_number_one_and_carries_the_given_reason() -> None:
    first = next_control(device(100), pool(100), DEFAULT_LADDER, T, why="provisioned", force=True)
    assert first == ControlMessage("dev-1", 1, T, "ok", 1000, 100, "provisioned")
    assert next_control(device(100), pool(100), DEFAULT_LADDER, T) is not None  # none sent yet


def test_no_message_is_issued_while_the_level_is_unchanged() -> None:
    dev = device(100, 10, control=True)
    assert next_control(dev, pool(100, 10), DEFAULT_LADDER, T) is None
    assert next_control(dev, pool(100, 79), DEFAULT_LADDER, T) is None  # balance moved, level not


def test_a_level_change_takes_the_next_number_and_states_the_balance() -> None:
    dev = device(100, 10, control=True)
    low = next_control(dev, pool(100, 85), DEFAULT_LADDER, T + 5)
    assert low == ControlMessage("dev-1", 8, T + 5, "throttle", 500, 15, "low_balance")
    lower = next_control(dev._replace(control=low), pool(100, 96), DEFAULT_LADDER, T + 6)
    assert lower == ControlMessage("dev-1", 9, T + 6, "throttle", 200, 4, "low_balance")
    blocked = next_control(dev._replace(control=lower), pool(100, 103), DEFAULT_LADDER, T + 7)
    assert blocked == ControlMessage("dev-1", 10, T + 7, "block", 0, -3, "exhausted")


def test_force_issues_a_new_number_even_when_the_level_is_unchanged() -> None:
    dev = device(100, 10, control=True)
    refill = next_control(dev, pool(100, 10), DEFAULT_LADDER, T, why="refill", force=True)
    assert refill is not None
    assert (refill.seq, refill.state, refill.why, refill.balance) == (8, "ok", "refill", 90)


def test_the_given_reason_applies_only_to_an_ok_level() -> None:
    """A refill that leaves the device throttled says why it is still throttled."""
    dev = device(100, 90, control=True)
    message = next_control(dev, pool(100, 90), DEFAULT_LADDER, T, why="refill", force=True)
    assert message is not None
    assert (message.state, message.why) == ("throttle", "low_balance")


def test_revocation_blocks_with_reason_revoked() -> None:
    dev = device(100, 10, control=True)._replace(revoked=True)
    message = next_control(dev, pool(100, 10), DEFAULT_LADDER, T, force=True)
    assert message is not None
    assert (message.seq, message.state, message.rate_permille, message.why) == (
        8, "block", 0, "revoked",
    )  # fmt: skip


def test_resuming_after_a_refill_is_a_change_of_level() -> None:
    dev = device(100, 100, control=True)
    assert dev.control is not None
    assert dev.control.state == "block"
    refilled = economics.credit(pool(100, 100), 100, T).pool
    message = next_control(dev, refilled, DEFAULT_LADDER, T)
    assert message is not None
    assert (message.state, message.rate_permille, message.balance) == ("ok", 1000, 100)


# --- when usage counts ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("device_ms", "received_ms", "attributed"),
    [
        pytest.param(T - DAY, T, T - DAY, id="an outage: when it happened"),
        pytest.param(T - 30 * DAY, T, T - 30 * DAY, id="exactly the maximum age"),
        pytest.param(T - 30 * DAY - 1, T, T, id="older than the maximum age: receipt"),
        pytest.param(T + 300_000, T, T + 300_000, id="five minutes ahead"),
        pytest.param(T + 300_001, T, T, id="more than five minutes ahead: receipt"),
        pytest.param(T, T, T, id="in step"),
        pytest.param(0, T, T, id="unset clock: receipt"),
        pytest.param(2**63 - 1, T, T, id="absurd clock: receipt"),
    ],
)
def test_usage_is_attributed_to_the_device_clock_only_when_plausible(
    device_ms: int, received_ms: int, attributed: int
) -> None:
    assert attributed_time(device_ms, received_ms, 30 * DAY) == attributed
