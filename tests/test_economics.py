"""The pure token economics (``gateway.economics``): table-driven cases and properties.

* Conservation (a hypothesis state machine per policy): the ledger movements and the
  debits explain the balance at every step; the balance is the live grants' remainders
  while positive; overage is exactly the part of each debit past zero.
* Burn order: priority, earliest expiry (never-expiring last), oldest, against a reference.
* Alerts: a threshold fires once per period, when ``used`` first reaches it; a top-up fires
  once per crossing below the floor and re-arms only at or above it.
* Periods: day, week and month boundaries (a month anchored on the 31st clamps), resets
  (settle, forfeit beyond the rollover cap, period grant) and the catch-up after an outage.
* Limits per policy.
"""

from __future__ import annotations

import calendar
import datetime as dt
from collections.abc import Iterable
from fractions import Fraction

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from gateway import economics
from gateway.economics import (
    POLICIES,
    Alert,
    GrantState,
    Limit,
    Movement,
    PeriodRule,
    PeriodUnit,
    Policy,
    Pool,
    PoolSettings,
    TopUpRule,
    advance,
    after_debit,
    cap_limit,
    configure,
    configure_period,
    credit,
    debit,
    is_due,
    next_boundary,
    period_start,
    pool_limit,
    settle,
    total,
)

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
DAY = 86_400_000
WEEK = 7 * DAY
HOUR = 3_600_000
PROPERTY = settings(max_examples=150, deadline=None)


def ms(*args: int) -> int:
    """Milliseconds since the epoch of the UTC moment ``datetime(*args)``."""
    moment = dt.datetime(*args, tzinfo=dt.UTC)
    return (moment - EPOCH) // dt.timedelta(milliseconds=1)


T0 = ms(2024, 1, 15, 9)


def pool(policy: Policy = "prepaid") -> Pool:
    """A fresh device pool under ``policy`` (overage cap 100 under ``overage``)."""
    settings_ = PoolSettings(policy=policy, overage_cap=100 if policy == "overage" else 0)
    return configure(Pool("dev-1", "acme"), settings_, T0)


def granted(start: Pool, *tokens: int, now_ms: int = T0) -> Pool:
    for amount in tokens:
        start = credit(start, amount, now_ms).pool
    return start


def kinds(alerts: Iterable[Alert], kind: str) -> list[Alert]:
    return [a for a in alerts if a.kind == kind]


def detail(alert: Alert, name: str) -> object:
    return dict(alert.details)[name]


def remainders(p: Pool) -> dict[int, int]:
    return {g.seq: g.remaining for g in p.grants}


# --- a reference burn order -----------------------------------------------------------


def reference_burn(grants: Iterable[GrantState], tokens: int) -> dict[int, int]:
    """What is left of each grant (by seq) after burning ``tokens`` in the documented
    order: lowest priority, then earliest expiry with never-expiring last, then oldest."""

    def order(g: GrantState) -> tuple[int, float, int]:
        return (g.priority, float("inf") if g.expires_ms is None else g.expires_ms, g.seq)

    left = tokens
    after = {}
    for g in sorted(grants, key=order):
        take = min(left, g.remaining)
        left -= take
        if g.remaining - take > 0:
            after[g.seq] = g.remaining - take
    return after


# --- credits and debits -----------------------------------------------------------------


def test_credit_adds_a_grant_and_a_grant_movement() -> None:
    out = credit(pool(), 100, T0, kind="initial", priority=2, expires_ms=T0 + DAY)
    (grant,) = out.pool.grants
    assert (grant.kind, grant.tokens, grant.remaining, grant.priority) == ("initial", 100, 100, 2)
    assert grant.expires_ms == T0 + DAY
    assert out.pool.allocation == out.pool.balance == 100
    (movement,) = out.movements
    assert (movement.kind, movement.tokens, movement.grant_seq) == ("grant", 100, grant.seq)
    assert (movement.grant_kind, movement.expires_ms) == ("initial", T0 + DAY)


def test_credit_leaves_its_input_untouched() -> None:
    before = granted(pool(), 50)
    credit(before, 10, T0)
    debit(before, 10)
    assert before.balance == 50
    assert remainders(before) == {1: 50}


def test_prepaid_debt_is_paid_first_by_the_next_grants() -> None:
    indebted, burn = debit(granted(pool(), 10), 50)
    assert (indebted.balance, burn.overage, indebted.overage) == (-40, 0, 0)
    partly = credit(indebted, 30, T0).pool
    assert partly.balance == -10
    assert partly.grants == ()
    paid = credit(partly, 100, T0)
    assert paid.pool.balance == 90
    assert [(g.tokens, g.remaining) for g in paid.pool.grants] == [(100, 90)]
    assert [m.kind for m in paid.movements] == ["grant"]


@pytest.mark.parametrize("policy", ["overage", "payg"])
def test_negative_balance_is_settled_not_repaid_under(policy: Policy) -> None:
    over, burn = debit(granted(pool(policy), 10), 50)
    assert (over.balance, burn.overage, over.overage) == (-40, 40, 40)
    out = credit(over, 100, T0 + 1)
    assert [(m.kind, m.tokens) for m in out.movements] == [("settle", 40), ("grant", 100)]
    assert out.pool.balance == 100
    assert out.pool.overage == 40  # still counted for this period's bill
    assert remainders(out.pool) == {2: 100}


@pytest.mark.parametrize("policy", ["overage", "payg"])
def test_overage_is_the_part_of_a_debit_past_zero(policy: Policy) -> None:
    p, burn = debit(granted(pool(policy), 30), 20)
    assert burn.overage == 0
    p, burn = debit(p, 25)
    assert (burn.tokens, burn.overage, p.overage, p.balance) == (25, 15, 15, -15)
    p, burn = debit(p, 5)
    assert (burn.overage, p.overage) == (5, 20)


def test_settle_is_a_no_op_at_or_above_zero() -> None:
    p = granted(pool("overage"), 10)
    assert settle(p, T0) == economics.Outcome(p)
    assert settle(debit(p, 10)[0], T0).movements == ()


def test_debit_of_zero_changes_nothing_but_the_record() -> None:
    p = granted(pool(), 10)
    after, burn = debit(p, 0)
    assert (burn.tokens, burn.overage) == (0, 0)
    assert after == p


# --- burn order ----------------------------------------------------------------------


def test_burn_order_priority_then_earliest_expiry_never_expiring_last_then_oldest() -> None:
    p = pool()
    p = credit(p, 10, T0, priority=1).pool  # 1
    p = credit(p, 10, T0, priority=0).pool  # 2: never expires
    p = credit(p, 10, T0, priority=0, expires_ms=T0 + 2 * DAY).pool  # 3
    p = credit(p, 10, T0, priority=0, expires_ms=T0 + DAY).pool  # 4
    p = credit(p, 10, T0, priority=0).pool  # 5: never expires, newer than 2
    p = credit(p, 10, T0, priority=0, expires_ms=T0 + DAY).pool  # 6: same expiry as 4
    order = []
    for _ in range(6):
        before = remainders(p)
        p = debit(p, 10)[0]
        (gone,) = set(before) - set(remainders(p))
        order.append(gone)
    assert order == [4, 6, 3, 2, 5, 1]


grant_specs = st.lists(
    st.tuples(
        st.integers(1, 60),  # tokens
        st.integers(0, 3),  # priority
        st.one_of(st.none(), st.integers(1, 5).map(lambda d: T0 + d * DAY)),  # expiry
    ),
    max_size=8,
)


@PROPERTY
@given(specs=grant_specs, debits=st.lists(st.integers(0, 120), min_size=1, max_size=5))
def test_debits_burn_grants_in_the_reference_order(
    specs: list[tuple[int, int, int | None]], debits: list[int]
) -> None:
    p = pool()
    for tokens, priority, expires in specs:
        p = credit(p, tokens, T0, priority=priority, expires_ms=expires).pool
    for tokens in debits:
        expected = reference_burn(p.grants, tokens)
        p = debit(p, tokens)[0]
        assert remainders(p) == expected
        assert all(g.remaining > 0 for g in p.grants)


# --- thresholds ----------------------------------------------------------------------


def with_thresholds(p: Pool, *shares: Fraction, topup: TopUpRule | None = None) -> Pool:
    return configure(p, PoolSettings(p.policy, p.overage_cap, p.period, shares, topup), T0)


def test_thresholds_fire_once_each_when_used_first_reaches_them() -> None:
    p = with_thresholds(granted(pool(), 100), Fraction(0), Fraction(1, 2), Fraction(9, 10))
    p = debit(p, 1)[0]
    out = after_debit(p, T0, "dev-1")
    assert [detail(a, "threshold") for a in out.alerts] == ["0%"]
    assert detail(out.alerts[0], "device") == "dev-1"
    p = debit(out.pool, 48)[0]  # used 49: below 50%
    assert after_debit(p, T0).alerts == ()
    p = debit(p, 1)[0]  # used 50: exactly 50%
    out = after_debit(p, T0)
    assert [detail(a, "threshold") for a in out.alerts] == ["50%"]
    p = debit(out.pool, 60)[0]  # past 90% and past zero
    out = after_debit(p, T0)
    assert [detail(a, "threshold") for a in out.alerts] == ["90%"]
    assert after_debit(out.pool, T0).alerts == ()  # edge-triggered: a replay fires nothing
    assert after_debit(debit(out.pool, 5)[0], T0).alerts == ()


def test_thresholds_crossed_together_fire_together_in_order() -> None:
    p = with_thresholds(granted(pool(), 100), Fraction(3, 4), Fraction(1, 4), Fraction(1, 2))
    out = after_debit(debit(p, 80)[0], T0)
    assert [detail(a, "threshold") for a in out.alerts] == ["25%", "50%", "75%"]
    assert out.pool.fired == (Fraction(1, 4), Fraction(1, 2), Fraction(3, 4))


def test_every_threshold_fires_at_the_first_token_of_an_empty_allocation() -> None:
    p = with_thresholds(pool("payg"), Fraction(0), Fraction(1, 2))
    assert after_debit(p, T0).alerts == ()  # nothing used yet
    out = after_debit(debit(p, 10)[0], T0)
    assert [detail(a, "threshold") for a in out.alerts] == ["0%", "50%"]


def test_thresholds_fire_again_after_a_period_reset() -> None:
    rule = PeriodRule("day", ms(2024, 1, 1), 100)
    p = configure(pool(), PoolSettings(period=rule, thresholds=(Fraction(1, 2),)), T0)
    p = granted(p, 100)
    first = after_debit(debit(p, 60)[0], T0)
    assert len(first.alerts) == 1
    assert after_debit(debit(first.pool, 10)[0], T0).alerts == ()
    reset = advance(first.pool, T0 + DAY)
    assert reset.pool.fired == ()
    assert after_debit(debit(reset.pool, 10)[0], T0 + DAY).alerts == ()
    again = after_debit(debit(reset.pool, 100)[0], T0 + DAY)
    assert [detail(a, "threshold") for a in again.alerts] == ["50%"]


# --- top-up --------------------------------------------------------------------------


def test_topup_fires_once_per_crossing_and_rearms_at_the_floor() -> None:
    p = with_thresholds(granted(pool(), 100), topup=TopUpRule(floor=20, tokens=10))
    p = debit(p, 85)[0]  # balance 15 < 20
    out = after_debit(p, T0)
    assert [(m.kind, m.tokens, m.grant_kind) for m in out.movements] == [("grant", 10, "topup")]
    assert [a.kind for a in out.alerts] == ["topup"]
    assert (out.pool.balance, out.pool.topup_armed) == (25, True)  # back above: re-armed
    p = debit(out.pool, 10)[0]  # 15 again: a new crossing
    out = after_debit(p, T0)
    assert out.pool.balance == 25
    p = debit(out.pool, 20)[0]  # 5: the top-up of 10 does not lift it to the floor
    out = after_debit(p, T0)
    assert (out.pool.balance, out.pool.topup_armed) == (15, False)
    repeat = after_debit(out.pool, T0)
    assert (repeat.movements, repeat.alerts, repeat.pool) == ((), (), out.pool)
    further = after_debit(debit(out.pool, 5)[0], T0)  # still below: the same crossing
    assert further.movements == ()
    rearmed = credit(further.pool, 20, T0).pool  # 30 >= 20
    assert rearmed.topup_armed
    p = debit(rearmed, 15)[0]
    assert total(after_debit(p, T0).movements, "grant") == 10


@pytest.mark.parametrize("policy", POLICIES)
def test_a_topup_of_an_empty_pool_fires_no_late_threshold(policy: Policy) -> None:
    p = with_thresholds(pool(policy), Fraction(1, 2), topup=TopUpRule(floor=0, tokens=10))
    first = after_debit(debit(p, 5)[0], T0)  # allocation 0: every threshold, then a top-up
    assert [a.kind for a in first.alerts] == ["threshold", "topup"]
    again = after_debit(first.pool, T0)  # nothing debited since
    assert (again.alerts, again.pool) == ((), first.pool)


@pytest.mark.parametrize("policy", POLICIES)
def test_topup_of_a_negative_balance(policy: Policy) -> None:
    p = with_thresholds(granted(pool(policy), 10), topup=TopUpRule(floor=0, tokens=50))
    p = debit(p, 30)[0]  # -20
    out = after_debit(p, T0)
    assert out.pool.balance == (30 if policy == "prepaid" else 50)
    assert out.pool.topup_armed


# --- periods: boundaries ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("unit", "anchor", "at", "start", "end"),
    [
        ("day", ms(2024, 1, 1, 6), ms(2024, 3, 10, 5), ms(2024, 3, 9, 6), ms(2024, 3, 10, 6)),
        ("day", ms(2024, 1, 1, 6), ms(2024, 3, 10, 6), ms(2024, 3, 10, 6), ms(2024, 3, 11, 6)),
        ("day", ms(2030, 1, 1), ms(2024, 3, 10, 5), ms(2024, 3, 10), ms(2024, 3, 11)),
        ("week", ms(2024, 1, 1), ms(2024, 1, 10), ms(2024, 1, 8), ms(2024, 1, 15)),
        ("week", ms(2024, 1, 1), ms(2023, 12, 31), ms(2023, 12, 25), ms(2024, 1, 1)),
        ("month", ms(2024, 1, 31), ms(2024, 2, 15), ms(2024, 1, 31), ms(2024, 2, 29)),
        ("month", ms(2024, 1, 31), ms(2024, 2, 29), ms(2024, 2, 29), ms(2024, 3, 31)),
        ("month", ms(2023, 1, 31), ms(2023, 3, 1), ms(2023, 2, 28), ms(2023, 3, 31)),
        ("month", ms(2023, 1, 31), ms(2023, 4, 30), ms(2023, 4, 30), ms(2023, 5, 31)),
        (
            "month",
            ms(2023, 1, 31, 12),
            ms(2023, 4, 30, 11),
            ms(2023, 3, 31, 12),
            ms(2023, 4, 30, 12),
        ),
        ("month", ms(2024, 3, 15), ms(2023, 12, 20), ms(2023, 12, 15), ms(2024, 1, 15)),
        ("month", ms(2024, 12, 31), ms(2025, 1, 1), ms(2024, 12, 31), ms(2025, 1, 31)),
    ],
)
def test_period_start_and_next_boundary(
    unit: PeriodUnit, anchor: int, at: int, start: int, end: int
) -> None:
    rule = PeriodRule(unit, anchor, 100)
    assert (period_start(rule, at), next_boundary(rule, at)) == (start, end)


def reference_month_boundary(anchor: dt.datetime, year: int, month: int) -> dt.datetime:
    last = calendar.monthrange(year, month)[1]
    return anchor.replace(year=year, month=month, day=min(anchor.day, last))


moments = st.datetimes(
    min_value=dt.datetime(1971, 1, 1), max_value=dt.datetime(2100, 12, 31, 23, 59, 59)
).map(lambda d: d.replace(microsecond=d.microsecond // 1000 * 1000, tzinfo=dt.UTC))
units = st.sampled_from(economics.PERIOD_UNITS)


def to_ms(moment: dt.datetime) -> int:
    return (moment - EPOCH) // dt.timedelta(milliseconds=1)


@PROPERTY
@given(unit=units, anchor=moments, at=moments)
def test_the_period_holding_a_moment_contains_it_and_starts_on_a_boundary(
    unit: PeriodUnit, anchor: dt.datetime, at: dt.datetime
) -> None:
    rule = PeriodRule(unit, to_ms(anchor), 0)
    start, end = period_start(rule, to_ms(at)), next_boundary(rule, to_ms(at))
    assert start <= to_ms(at) < end
    assert period_start(rule, start) == start
    assert next_boundary(rule, start) == end
    assert period_start(rule, end) == end
    assert period_start(rule, end - 1) == start
    if unit != "month":
        length = DAY if unit == "day" else WEEK
        assert end - start == length
        assert (start - rule.anchor_ms) % length == 0
        return
    begin = EPOCH + dt.timedelta(milliseconds=start)
    assert begin == reference_month_boundary(anchor, begin.year, begin.month)
    year, month = divmod(begin.year * 12 + begin.month, 12)
    assert end == to_ms(reference_month_boundary(anchor, year, month + 1))


@settings(max_examples=40, deadline=None)
@given(unit=units, anchor=moments, at=moments)
def test_boundaries_strictly_increase(
    unit: PeriodUnit, anchor: dt.datetime, at: dt.datetime
) -> None:
    rule = PeriodRule(unit, to_ms(anchor), 0)
    boundary = to_ms(at)
    for _ in range(30):
        following = next_boundary(rule, boundary)
        assert following > boundary
        assert period_start(rule, following) == following
        boundary = following


def test_a_month_anchored_on_the_31st_clamps_and_returns() -> None:
    rule = PeriodRule("month", ms(2023, 10, 31, 8), 0)
    boundary, days = rule.anchor_ms, []
    for _ in range(18):
        boundary = next_boundary(rule, boundary)
        days.append((EPOCH + dt.timedelta(milliseconds=boundary)).date().isoformat())
    assert days[:6] == [
        "2023-11-30", "2023-12-31", "2024-01-31", "2024-02-29", "2024-03-31", "2024-04-30",
    ]  # fmt: skip
    assert days[15] == "2025-02-28"


# --- periods: resets -------------------------------------------------------------------

ANCHOR = ms(2024, 1, 1)
BOUNDARY = ms(2024, 1, 16)  # the first day boundary after T0


def periodic(policy: Policy = "prepaid", tokens: int = 100, rollover_cap: int = 0) -> Pool:
    rule = PeriodRule("day", ANCHOR, tokens, rollover_cap)
    settings_ = PoolSettings(policy, 100 if policy == "overage" else 0, rule, (Fraction(1, 2),))
    return configure(Pool("dev-1", "acme"), settings_, T0)


def test_configure_period_takes_the_period_holding_now() -> None:
    p = periodic()
    assert (p.period_start_ms, p.period_end_ms) == (ms(2024, 1, 15), BOUNDARY)
    assert not is_due(p, BOUNDARY - 1)
    assert is_due(p, BOUNDARY)
    unbound = configure_period(p, None, T0)
    assert (unbound.period, unbound.period_end_ms) == (None, None)
    assert advance(unbound, T0 + 100 * DAY) == economics.Outcome(unbound)


def test_a_reset_forfeits_beyond_the_rollover_keeps_own_expiries_and_grants_the_period() -> None:
    p = periodic(tokens=100, rollover_cap=10)
    p = credit(p, 80, T0).pool  # 1: bound to the period
    p = credit(p, 50, T0, priority=1, expires_ms=BOUNDARY + 3 * DAY).pool  # 2: own expiry
    p = credit(p, 40, T0, priority=-1).pool  # 3: bound, burnt first
    p = debit(p, 90)[0]  # 3 gone, 1 left at 30: used 90 of 170, past half
    p = after_debit(p, T0).pool
    assert p.fired == (Fraction(1, 2),)
    out = advance(p, BOUNDARY + HOUR)
    assert [(m.kind, m.tokens) for m in out.movements] == [("forfeit", 20), ("grant", 100)]
    (reset,) = kinds(out.alerts, "period_reset")
    assert (detail(reset, "rolled_over"), detail(reset, "forfeited")) == (10, 20)
    q = out.pool
    assert (q.period_start_ms, q.period_end_ms) == (BOUNDARY, BOUNDARY + DAY)
    assert (q.used, q.overage, q.forfeited, q.settled, q.fired) == (0, 0, 0, 0, ())
    assert q.balance == q.allocation == 50 + 10 + 100
    by_kind = {g.kind: g for g in q.grants}
    assert by_kind["grant"].expires_ms == BOUNDARY + 3 * DAY
    assert (by_kind["rollover"].remaining, by_kind["rollover"].expires_ms) == (10, BOUNDARY + DAY)
    assert (by_kind["period"].remaining, by_kind["period"].expires_ms) == (100, None)
    assert sum(g.remaining for g in q.grants) == q.balance


def test_the_rollover_grant_expires_at_the_end_of_the_new_period() -> None:
    p = credit(periodic(tokens=100, rollover_cap=30), 100, T0).pool
    out = advance(p, BOUNDARY + DAY)  # two boundaries
    expected = [
        ("forfeit", 70),  # first reset: 100 bound, 30 rolled over
        ("grant", 100),
        ("forfeit", 30),  # the rollover expires at the second boundary...
        ("forfeit", 70),  # ...before it resets (the period grant: 100, 30 rolled over)
        ("grant", 100),
    ]
    assert [(m.kind, m.tokens) for m in out.movements] == expected
    assert [a.kind for a in out.alerts] == ["period_reset", "grant_expired", "period_reset"]
    assert out.pool.balance == 130


@pytest.mark.parametrize("policy", ["overage", "payg"])
def test_a_reset_settles_a_negative_balance(policy: Policy) -> None:
    p = debit(credit(periodic(policy), 10, T0).pool, 50)[0]
    out = advance(p, BOUNDARY)
    assert [(m.kind, m.tokens) for m in out.movements] == [("settle", 40), ("grant", 100)]
    assert (out.pool.balance, out.pool.used, out.pool.overage) == (100, 0, 0)


def test_a_prepaid_debt_carries_over_and_the_period_grant_pays_it_first() -> None:
    p = debit(credit(periodic("prepaid"), 10, T0).pool, 50)[0]  # balance -40
    out = advance(p, BOUNDARY)
    assert total(out.movements, "settle") == 0
    assert out.pool.balance == 60
    assert out.pool.used == 40
    assert [(g.kind, g.remaining) for g in out.pool.grants] == [("period", 60)]


def test_an_expiry_forfeits_the_remainder_of_the_grants_due() -> None:
    p = with_thresholds(pool(), topup=TopUpRule(floor=10, tokens=5))
    p = credit(p, 30, T0, expires_ms=T0 + HOUR).pool
    p = credit(p, 20, T0).pool
    p = debit(p, 5)[0]  # from the expiring grant: 25 left
    assert advance(p, T0 + HOUR - 1).pool == p
    out = advance(p, T0 + HOUR)
    assert [(m.kind, m.tokens) for m in out.movements] == [("forfeit", 25)]
    (alert,) = out.alerts
    assert (alert.kind, detail(alert, "grants"), detail(alert, "balance")) == (
        "grant_expired", [1], 20,
    )  # fmt: skip
    assert (out.pool.balance, out.pool.forfeited) == (20, 25)


def test_a_long_outage_applies_every_boundary_in_order() -> None:
    p = credit(periodic(tokens=100), 100, T0).pool
    out = advance(p, BOUNDARY + 39 * DAY + HOUR)
    resets = kinds(out.alerts, "period_reset")
    assert [a.at_ms for a in resets] == [BOUNDARY + k * DAY for k in range(40)]
    assert total(out.movements, "grant") == 40 * 100
    assert out.pool.balance == 100
    assert out.pool.period_start_ms == BOUNDARY + 39 * DAY
    assert not is_due(out.pool, BOUNDARY + 39 * DAY + HOUR)


def test_beyond_max_catch_up_the_pool_jumps_to_the_current_period(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(economics, "MAX_CATCH_UP", 5)
    p = credit(periodic(tokens=100), 100, T0).pool
    now = BOUNDARY + 30 * DAY + HOUR
    out = advance(p, now)
    resets = kinds(out.alerts, "period_reset")
    assert [a.at_ms for a in resets] == [BOUNDARY + k * DAY for k in range(5)] + [now - HOUR]
    assert (out.pool.period_start_ms, out.pool.period_end_ms) == (now - HOUR, now - HOUR + DAY)
    assert out.pool.balance == 100
    assert not is_due(out.pool, now)
    grants = total(out.movements, "grant")
    assert grants - total(out.movements, "forfeit") == out.pool.balance - p.balance


def test_the_jump_after_max_catch_up_leaves_no_expired_grant(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(economics, "MAX_CATCH_UP", 4)
    p = periodic(tokens=100, rollover_cap=30)
    now = BOUNDARY + 10 * DAY
    out = advance(p, now)
    assert all(g.expires_ms is None or g.expires_ms > now for g in out.pool.grants)
    assert not is_due(out.pool, now)
    assert out.pool.balance == 130


# --- limits --------------------------------------------------------------------------


def test_pool_limit_per_policy() -> None:
    prepaid = debit(granted(pool("prepaid"), 100), 30)[0]
    assert pool_limit(prepaid) == Limit(70, 100, "exhausted")
    assert pool_limit(debit(prepaid, 80)[0]) == Limit(-10, 100, "exhausted")
    overage = debit(granted(pool("overage"), 100), 30)[0]
    assert pool_limit(overage) == Limit(70 + 100, 200, "overage_cap")
    past = debit(overage, 90)[0]  # balance -20, overage 20
    assert pool_limit(past) == Limit(0 + 100 - 20, 200, "overage_cap")
    assert pool_limit(debit(past, 100)[0]) == Limit(-20, 200, "overage_cap")
    assert pool_limit(debit(granted(pool("payg"), 100), 500)[0]) is None


def test_configure_drops_the_overage_cap_outside_the_overage_policy() -> None:
    p = configure(Pool("dev-1", "acme"), PoolSettings("prepaid", overage_cap=50), T0)
    assert p.overage_cap == 0
    assert economics.settings_of(pool("overage")).overage_cap == 100


def test_configure_keeps_the_running_numbers_and_only_what_still_applies() -> None:
    rule = PeriodRule("week", ANCHOR, 100)
    shares = (Fraction(1, 2), Fraction(1, 4), Fraction(1, 2))
    topup = TopUpRule(floor=50, tokens=5)
    p = configure(granted(pool(), 100), PoolSettings(period=rule, thresholds=shares), T0)
    assert p.thresholds == (Fraction(1, 4), Fraction(1, 2))
    p = after_debit(debit(p, 30)[0], T0).pool
    assert p.fired == (Fraction(1, 4),)
    p = p._replace(topup=topup, topup_armed=False)
    same = configure(
        p, PoolSettings(period=rule, thresholds=(Fraction(1, 4),), topup=topup), T0 + DAY
    )
    assert (same.period_end_ms, same.fired, same.topup_armed) == (p.period_end_ms, p.fired, False)
    assert (same.balance, same.used, same.grants) == (p.balance, p.used, p.grants)
    changed = configure(p, PoolSettings("overage", 10, None, (Fraction(1, 2),)), T0 + DAY)
    assert (changed.period, changed.period_end_ms, changed.fired) == (None, None, ())
    assert (changed.topup, changed.topup_armed, changed.balance) == (None, True, 70)


def test_cap_limit() -> None:
    assert cap_limit(None, 50) is None
    assert cap_limit(100, 30) == Limit(70, 100, "cap_reached")
    assert cap_limit(100, 130) == Limit(-30, 100, "cap_reached")


# --- conservation: a state machine per policy -------------------------------------------

SHARES = tuple(Fraction(n, 20) for n in (0, 5, 10, 18, 20, 30))  # 0% to 150%
rules = st.builds(
    PeriodRule,
    unit=units,
    anchor_ms=st.integers(ms(2023, 1, 1), ms(2024, 12, 31)).map(lambda t: t - t % HOUR),
    tokens=st.integers(0, 200),
    rollover_cap=st.integers(0, 150),
)


class PoolMachine(RuleBasedStateMachine):
    """Random credits, debits, expiries, resets, alerts and top-ups on one pool, checking
    after every step what the ledger (movements and debits) says against the pool."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = Pool("dev-1", "acme")
        self.now = T0
        self.movements: list[Movement] = []
        self.debited = 0
        self.overage = 0  # this period's tokens debited past zero
        self.fired: set[Fraction] = set()  # threshold alerts heard this period

    def record(self, outcome: economics.Outcome) -> None:
        self.movements += outcome.movements
        for alert in outcome.alerts:
            event(f"{self.pool.policy}: {alert.kind}")
        if kinds(outcome.alerts, "period_reset"):
            self.overage = 0
            self.fired = set()
        self.pool = outcome.pool

    @initialize(
        policy=st.sampled_from(POLICIES),
        cap=st.integers(0, 300),
        rule=st.one_of(st.none(), rules),
        shares=st.sets(st.sampled_from(SHARES), max_size=4),
        topup=st.one_of(st.none(), st.builds(TopUpRule, st.integers(0, 100), st.integers(0, 80))),
        initial=st.integers(0, 300),
    )
    def start(
        self,
        policy: Policy,
        cap: int,
        rule: PeriodRule | None,
        shares: set[Fraction],
        topup: TopUpRule | None,
        initial: int,
    ) -> None:
        setup = PoolSettings(policy, cap, rule, tuple(shares), topup)
        self.pool = configure(self.pool, setup, self.now)
        self.record(credit(self.pool, initial, self.now, kind="initial"))

    @rule(
        tokens=st.integers(0, 200),
        priority=st.integers(-1, 2),
        days=st.one_of(st.none(), st.integers(0, 40)),
        kind=st.sampled_from(("grant", "refill", "topup", "initial")),
    )
    def grant(self, tokens: int, priority: int, days: int | None, kind: str) -> None:
        expires = None if days is None else self.now + 1 + days * DAY
        before = self.pool.balance
        out = credit(self.pool, tokens, self.now, kind=kind, priority=priority, expires_ms=expires)
        assert total(out.movements, "grant") == tokens
        settled = total(out.movements, "settle")
        assert settled == (max(-before, 0) if self.pool.policy != "prepaid" else 0)
        self.record(out)

    @rule(tokens=st.one_of(st.integers(0, 60), st.integers(0, 600)))
    def spend(self, tokens: int) -> None:
        before = self.pool
        expected = reference_burn(before.grants, tokens)
        after, burn = debit(before, tokens)
        past = max(tokens - max(before.balance, 0), 0) if before.policy != "prepaid" else 0
        assert (burn.tokens, burn.overage) == (tokens, past)
        assert remainders(after) == expected
        self.debited += tokens
        self.overage += past
        event(f"{before.policy}: debit past zero" if tokens > max(before.balance, 0) else "debit")
        self.pool = after

    @rule(delta=st.one_of(st.integers(0, 3 * DAY), st.integers(0, 70 * DAY)))
    def wait(self, delta: int) -> None:
        self.now += delta
        out = advance(self.pool, self.now)
        for reset in kinds(out.alerts, "period_reset"):
            assert detail(reset, "forfeited") >= 0
        self.record(out)
        assert not is_due(self.pool, self.now)
        assert all(g.expires_ms is None or g.expires_ms > self.now for g in self.pool.grants)
        if self.pool.period is not None:
            assert self.pool.period_start_ms <= self.now < self.pool.period_end_ms
            assert self.pool.period_start_ms == period_start(self.pool.period, self.now)

    @precondition(lambda self: self.pool.policy != "prepaid")
    @rule()
    def write_off(self) -> None:
        before = self.pool.balance
        out = settle(self.pool, self.now)
        assert total(out.movements, "settle") == max(-before, 0)
        self.record(out)

    @rule()
    def react(self) -> None:
        before = self.pool
        out = after_debit(before, self.now)
        new = [s for s in out.pool.fired if s not in before.fired]
        assert len(kinds(out.alerts, "threshold")) == len(new) == len(set(new))
        assert not self.fired & set(new), "a threshold fired twice in one period"
        self.fired |= set(new)
        for share in before.thresholds:
            reached = 0 < before.used >= share * before.allocation
            assert (share in out.pool.fired) == (reached or share in before.fired)
        rule_ = before.topup
        due = rule_ is not None and before.topup_armed and before.balance < rule_.floor
        topups = [m for m in out.movements if m.kind == "grant"]
        assert [m.tokens for m in topups] == ([rule_.tokens] if due and rule_ else [])
        assert len(kinds(out.alerts, "topup")) == (1 if due else 0)
        self.record(out)
        again = after_debit(self.pool, self.now)
        assert (again.movements, again.alerts, again.pool) == ((), (), self.pool)

    @rule(rule_=st.one_of(st.none(), rules))
    def reconfigure_period(self, rule_: PeriodRule | None) -> None:
        before = self.pool
        self.pool = configure_period(before, rule_, self.now)
        assert self.pool.balance == before.balance
        assert self.pool.grants == before.grants

    @invariant()
    def ledger_explains_the_balance(self) -> None:
        p = self.pool
        explained = (
            total(self.movements, "grant")
            + total(self.movements, "settle")
            - self.debited
            - total(self.movements, "forfeit")
        )
        assert explained == p.balance
        assert p.balance == p.allocation + p.settled - p.used - p.forfeited
        assert all(m.tokens >= 0 for m in self.movements)

    @invariant()
    def grants_hold_the_positive_balance(self) -> None:
        p = self.pool
        assert all(0 < g.remaining <= g.tokens for g in p.grants)
        if p.balance > 0:
            assert sum(g.remaining for g in p.grants) == p.balance
        else:
            assert p.grants == ()

    @invariant()
    def overage_is_the_tokens_debited_past_zero_this_period(self) -> None:
        assert self.pool.overage == (self.overage if self.pool.policy != "prepaid" else 0)
        assert self.pool.used >= 0

    @invariant()
    def topup_is_disarmed_only_below_the_floor(self) -> None:
        p = self.pool
        if p.topup is not None and not p.topup_armed:
            assert p.balance < p.topup.floor


PoolMachine.TestCase.settings = settings(max_examples=400, stateful_step_count=40, deadline=None)
TestPoolConservation = PoolMachine.TestCase
