"""Token economics, pure: allocations (pools), grants, policies, periods, alerts, top-ups.

No I/O and no clock: every function takes ``now_ms`` and returns new values plus the
ledger :class:`Movement` values that explain the change, leaving its inputs untouched.

A **pool** is one allocation of tokens: a device's *dedicated* allocation (key = the
device id) or an account's *shared* pool (key = ``"@" + account``; device ids cannot
contain ``@``). Its numbers, for the current period:

* ``allocation``: tokens available at the period's start plus tokens granted since;
* ``used``: tokens debited; ``forfeited``: tokens of grants that expired or were reset;
* ``settled``: overage written off for billing (``overage`` and ``payg`` policies);
* ``balance = allocation + settled - used - forfeited``; negative under overage.

Conservation, checkable from the ledger at every step: the sum of a pool's grant
movements plus its settle movements, minus its debits and forfeits, equals its balance.
While the balance is positive it is exactly the sum of the live grants' remainders;
while it is zero or negative no grant has anything left.

**Policies.** ``prepaid``: the device is blocked at zero; tokens debited past zero (in
flight when the block was sent) are a debt the next grant pays first. ``overage``: the
balance may run past zero up to ``overage_cap`` tokens per period; tokens past zero are
recorded as overage, for billing, and are settled (not repaid from a later grant).
``payg``: no limit, never blocks; everything past the grants is overage, for billing.

**Burn order.** A debit takes tokens from the live grants in a fixed order: lowest
``priority`` number first, then earliest expiry (grants that never expire last), then
oldest (lowest sequence number).

**Periods.** A pool with a :class:`PeriodRule` resets at each boundary (UTC, anchored to
``anchor_ms``, every day, week or month; a month anchored on the 31st resets on the last
day of shorter months): overage is settled, the remainders of grants that have no expiry
of their own are forfeited except up to ``rollover_cap`` tokens, which carry over as a
``rollover`` grant expiring at the end of the new period; grants with their own expiry
keep it; then the period's ``tokens`` are granted. A prepaid debt carries over.

**Alerts.** ``thresholds`` are shares of the allocation used; each fires at most once
per period, when ``used`` first reaches it (``0%``, or any share of an empty allocation:
at the first token; edge-triggered,
so a replayed report, which debits nothing, cannot fire one again). **Top-up**: when
the balance falls below ``floor`` the pool is granted ``tokens``, once per crossing: the
rule re-arms only when the balance is back at or above the floor.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from operator import attrgetter
from typing import Literal, NamedTuple

from gateway.pricing import format_price

Policy = Literal["prepaid", "overage", "payg"]
POLICIES: tuple[Policy, ...] = ("prepaid", "overage", "payg")
PeriodUnit = Literal["day", "week", "month"]
PERIOD_UNITS: tuple[PeriodUnit, ...] = ("day", "week", "month")
GrantKind = Literal["initial", "refill", "grant", "topup", "period", "rollover"]
GRANT_KINDS: tuple[GrantKind, ...] = ("initial", "refill", "grant", "topup", "period", "rollover")
MovementKind = Literal["grant", "settle", "forfeit"]

_DAY_MS = 86_400_000
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
MAX_CATCH_UP = 10_000  # expiries and boundaries applied one by one after an outage, at most


def shared_pool_key(account: str) -> str:
    """The key of an account's shared pool."""
    return "@" + account


@dataclass(frozen=True, slots=True)
class PeriodRule:
    """Subscription periods: every ``unit`` from ``anchor_ms``, granting ``tokens``."""

    unit: PeriodUnit
    anchor_ms: int
    tokens: int
    rollover_cap: int = 0


@dataclass(frozen=True, slots=True)
class TopUpRule:
    """Grant ``tokens`` whenever the balance falls below ``floor`` (once per crossing)."""

    floor: int
    tokens: int


class GrantState(NamedTuple):
    """A credit and what is left of it. ``expires_ms`` None: lives until a period reset."""

    seq: int
    kind: GrantKind
    tokens: int
    remaining: int
    priority: int
    expires_ms: int | None
    created_ms: int

    @property
    def burn_key(self) -> tuple[int, bool, int, int]:
        """Sort key of the burn order: priority, earliest expiry (none last), oldest."""
        return (self.priority, self.expires_ms is None, self.expires_ms or 0, self.seq)


class Pool(NamedTuple):
    """One allocation's state (see the module docstring for the meaning of each number)."""

    key: str
    account: str
    policy: Policy = "prepaid"
    overage_cap: int = 0
    period: PeriodRule | None = None
    period_start_ms: int = 0
    period_end_ms: int | None = None
    allocation: int = 0
    used: int = 0
    settled: int = 0
    forfeited: int = 0
    overage: int = 0
    grants: tuple[GrantState, ...] = ()
    thresholds: tuple[Fraction, ...] = ()
    fired: tuple[Fraction, ...] = ()
    topup: TopUpRule | None = None
    topup_armed: bool = True
    next_seq: int = 1

    @property
    def balance(self) -> int:
        return self.allocation + self.settled - self.used - self.forfeited

    @property
    def shared(self) -> bool:
        return self.key.startswith("@")


@dataclass(frozen=True, slots=True)
class Movement:
    """A ledger entry other than a debit: a grant, a settled overage or a forfeit.

    ``grant``: ``tokens`` credited as grant ``grant_seq`` of ``grant_kind``. ``settle``:
    overage written off for billing. ``forfeit``: remainders of expired or reset grants.
    """

    pool: str
    account: str
    kind: MovementKind
    tokens: int
    at_ms: int
    grant_seq: int | None = None
    grant_kind: GrantKind | None = None
    priority: int = 0
    expires_ms: int | None = None
    idempotency_key: str | None = None
    device: str | None = None


class Burn(NamedTuple):
    """What one debit did: ``tokens`` in all, of which ``overage`` past zero (billed)."""

    tokens: int
    overage: int


@dataclass(frozen=True, slots=True)
class Alert:
    """Something operators hear about: a threshold crossed, a top-up, a reset, an expiry."""

    kind: Literal["threshold", "topup", "period_reset", "grant_expired"]
    pool: str
    at_ms: int
    details: tuple[tuple[str, object], ...] = ()


@dataclass(frozen=True, slots=True)
class Outcome:
    """A pool after an operation, with the ledger movements and alerts it produced."""

    pool: Pool
    movements: tuple[Movement, ...] = ()
    alerts: tuple[Alert, ...] = ()

    def then(self, other: Outcome) -> Outcome:
        """This outcome followed by ``other`` (which started from ``self.pool``)."""
        return Outcome(other.pool, self.movements + other.movements, self.alerts + other.alerts)


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """What an operator configures on a pool (the rest is its running state)."""

    policy: Policy = "prepaid"
    overage_cap: int = 0
    period: PeriodRule | None = None
    thresholds: tuple[Fraction, ...] = ()
    topup: TopUpRule | None = None


def configure(pool: Pool, settings: PoolSettings, now_ms: int) -> Pool:
    """``pool`` under new settings. The running numbers are kept; a new period rule takes
    the period holding ``now_ms`` as the current one (its first reset is the next
    boundary); thresholds already fired this period stay fired."""
    configured = pool._replace(
        policy=settings.policy,
        overage_cap=settings.overage_cap if settings.policy == "overage" else 0,
        thresholds=tuple(sorted(set(settings.thresholds))),
        fired=tuple(f for f in pool.fired if f in settings.thresholds),
        topup=settings.topup,
        topup_armed=True if settings.topup != pool.topup else pool.topup_armed,
    )
    if settings.period != pool.period:
        configured = configure_period(configured, settings.period, now_ms)
    return configured


def settings_of(pool: Pool) -> PoolSettings:
    """The operator-set part of ``pool``."""
    return PoolSettings(pool.policy, pool.overage_cap, pool.period, pool.thresholds, pool.topup)


# --- credits ------------------------------------------------------------------------


def credit(
    pool: Pool,
    tokens: int,
    now_ms: int,
    *,
    kind: GrantKind = "grant",
    priority: int = 0,
    expires_ms: int | None = None,
    idempotency_key: str | None = None,
) -> Outcome:
    """Grant ``tokens`` (>= 0) to ``pool``.

    Under ``overage`` and ``payg`` a negative balance is settled first (billed, not repaid);
    under ``prepaid`` the grant pays the debt first. The caller checks that ``expires_ms``
    is in the future.
    """
    outcome = Outcome(pool)
    if pool.balance < 0 and pool.policy != "prepaid":
        outcome = outcome.then(settle(pool, now_ms))
        pool = outcome.pool
    debt = max(-pool.balance, 0)
    grant = GrantState(
        pool.next_seq, kind, tokens, tokens - min(tokens, debt), priority, expires_ms, now_ms
    )
    grants = pool.grants + ((grant,) if grant.remaining > 0 else ())
    credited = pool._replace(
        allocation=pool.allocation + tokens, grants=grants, next_seq=pool.next_seq + 1
    )
    credited = _rearm(credited)
    movement = Movement(
        pool.key, pool.account, "grant", tokens, now_ms, grant.seq, kind, priority, expires_ms,
        idempotency_key,
    )  # fmt: skip
    return outcome.then(Outcome(credited, (movement,)))


def settle(pool: Pool, now_ms: int) -> Outcome:
    """Write off a negative balance as billed overage (no-op when the balance is >= 0)."""
    owed = -pool.balance
    if owed <= 0:
        return Outcome(pool)
    movement = Movement(pool.key, pool.account, "settle", owed, now_ms)
    return Outcome(pool._replace(settled=pool.settled + owed), (movement,))


def _rearm(pool: Pool) -> Pool:
    if pool.topup is not None and not pool.topup_armed and pool.balance >= pool.topup.floor:
        return pool._replace(topup_armed=True)
    return pool


# --- debits -------------------------------------------------------------------------


def debit(pool: Pool, tokens: int) -> tuple[Pool, Burn]:
    """Take ``tokens`` (>= 0) from ``pool``'s grants in burn order.

    What the grants cannot cover takes the balance below zero: overage under ``overage``
    and ``payg``, a debt under ``prepaid``. A debit is never refused: the usage happened.
    """
    left = tokens
    kept: list[GrantState] = []
    grants = pool.grants if len(pool.grants) < 2 else sorted(pool.grants, key=_burn_key)
    for grant in grants:
        take = min(left, grant.remaining)
        left -= take
        if grant.remaining > take:
            kept.append(grant if take == 0 else grant._replace(remaining=grant.remaining - take))
    overage = left if pool.policy != "prepaid" else 0
    if len(kept) > 1:
        kept.sort(key=_seq)
    debited = pool._replace(
        used=pool.used + tokens, overage=pool.overage + overage, grants=tuple(kept)
    )
    return debited, Burn(tokens, overage)


_burn_key = attrgetter("burn_key")
_seq = attrgetter("seq")


def after_debit(pool: Pool, now_ms: int, device: str | None = None) -> Outcome:
    """Thresholds crossed and the automatic top-up due after debits (call once per batch
    or per report: both are edge-triggered, so calling again changes nothing)."""
    rule = pool.topup
    topup_due = rule is not None and pool.topup_armed and pool.balance < rule.floor
    if not topup_due and len(pool.fired) == len(pool.thresholds):
        return Outcome(pool)  # the common case, kept cheap: it runs for every batch
    alerts: list[Alert] = []
    fired = list(pool.fired)
    for share in sorted(pool.thresholds):
        # With nothing allocated, any use is past every share: all fire at the first
        # token (and a top-up that follows cannot make one fire later, on a replay).
        if share not in fired and 0 < pool.used >= share * pool.allocation:
            fired.append(share)
            alerts.append(
                Alert("threshold", pool.key, now_ms, _details(
                    threshold=format_share(share), used=pool.used, allocation=pool.allocation,
                    device=device,
                ))
            )  # fmt: skip
    outcome = Outcome(pool._replace(fired=tuple(fired)), (), tuple(alerts))
    if rule is not None and topup_due:
        disarmed = outcome.pool._replace(topup_armed=False)
        topped = credit(disarmed, rule.tokens, now_ms, kind="topup")
        alert = Alert("topup", pool.key, now_ms, _details(
            tokens=rule.tokens, floor=rule.floor, balance=topped.pool.balance, device=device,
        ))  # fmt: skip
        outcome = outcome.then(Outcome(topped.pool, topped.movements, (alert,)))
    return outcome


# --- time: expiry and periods -------------------------------------------------------


def advance(pool: Pool, now_ms: int) -> Outcome:
    """Apply, in time order, every grant expiry and period boundary at or before ``now_ms``."""
    if not is_due(pool, now_ms):
        return Outcome(pool)  # the common case, kept cheap: it runs for every batch
    outcome = Outcome(pool)
    for _ in range(MAX_CATCH_UP):
        pool = outcome.pool
        expiry = min((g.expires_ms for g in pool.grants if g.expires_ms is not None), default=None)
        boundary = pool.period_end_ms
        due = [t for t in (expiry, boundary) if t is not None and t <= now_ms]
        if not due:
            return outcome
        at = min(due)
        if expiry is not None and expiry == at:
            outcome = outcome.then(_expire(pool, at))
        else:
            outcome = outcome.then(_reset(pool, at))
    return outcome.then(_skip_to(outcome.pool, now_ms))


def is_due(pool: Pool, now_ms: int) -> bool:
    """Whether a period boundary or a grant expiry of ``pool`` has come by ``now_ms``."""
    due = next_due_ms(pool)
    return due is not None and due <= now_ms


def next_due_ms(pool: Pool) -> int | None:
    """The earliest period boundary or grant expiry of ``pool`` (None: neither)."""
    return earliest_due_ms(pool.period_end_ms, map(_expires, pool.grants))


def earliest_due_ms(period_end_ms: int | None, expiries: Iterable[int | None]) -> int | None:
    """The earliest of a period's end and grant expiries, None standing for "never"."""
    due = period_end_ms
    for expires in expiries:  # a loop, not min() over a built list: twice a report
        if expires is not None and (due is None or expires < due):
            due = expires
    return due


_expires = attrgetter("expires_ms")


def _expire(pool: Pool, at_ms: int) -> Outcome:
    gone = [g for g in pool.grants if g.expires_ms is not None and g.expires_ms <= at_ms]
    lost = sum(g.remaining for g in gone)
    kept = tuple(g for g in pool.grants if g not in gone)
    expired = _rearm(pool._replace(grants=kept, forfeited=pool.forfeited + lost))
    movement = Movement(pool.key, pool.account, "forfeit", lost, at_ms)
    alert = Alert("grant_expired", pool.key, at_ms, _details(
        tokens=lost, grants=[g.seq for g in gone], balance=expired.balance,
    ))  # fmt: skip
    return Outcome(expired, (movement,), (alert,))


def _reset(pool: Pool, at_ms: int) -> Outcome:
    """The period boundary ``at_ms``: settle, forfeit (keeping the rollover), start anew."""
    rule = pool.period
    assert rule is not None
    outcome = settle(pool, at_ms) if pool.policy != "prepaid" else Outcome(pool)  # a debt stays
    pool = outcome.pool
    bound = [g for g in pool.grants if g.expires_ms is None]
    own = tuple(g for g in pool.grants if g.expires_ms is not None)
    left = sum(g.remaining for g in bound)
    rolled = min(left, rule.rollover_cap)
    end = next_boundary(rule, at_ms)
    grants = own
    seq = pool.next_seq
    if rolled > 0:
        grants += (GrantState(seq, "rollover", rolled, rolled, 0, end, at_ms),)
        seq += 1
    balance = pool.balance - (left - rolled)
    pool = pool._replace(
        period_start_ms=at_ms,
        period_end_ms=end,
        allocation=max(balance, 0),
        used=max(-balance, 0),
        settled=0,
        forfeited=0,
        overage=0,
        fired=(),
        grants=grants,
        next_seq=seq,
    )
    forfeit = (Movement(pool.key, pool.account, "forfeit", left - rolled, at_ms),)
    outcome = outcome.then(Outcome(pool, forfeit if left > rolled else ()))
    outcome = outcome.then(credit(pool, rule.tokens, at_ms, kind="period"))
    alert = Alert("period_reset", pool.key, at_ms, _details(
        period_start=at_ms, period_end=end, rolled_over=rolled, forfeited=left - rolled,
        balance=outcome.pool.balance,
    ))  # fmt: skip
    return outcome.then(Outcome(outcome.pool, (), (alert,)))


def _skip_to(pool: Pool, now_ms: int) -> Outcome:
    """After ``MAX_CATCH_UP`` events, jump: the grants expired by the last boundary go,
    then one reset at that boundary, then what expired since."""
    outcome = Outcome(pool)
    if pool.period is not None and pool.period_end_ms is not None:
        start = period_start(pool.period, now_ms)
        if start >= pool.period_end_ms:
            if any(g.expires_ms is not None and g.expires_ms <= start for g in pool.grants):
                outcome = _expire(pool, start)
            outcome = outcome.then(_reset(outcome.pool, start))
    if is_due(outcome.pool, now_ms):
        outcome = outcome.then(_expire(outcome.pool, now_ms))
    return outcome


def configure_period(pool: Pool, rule: PeriodRule | None, now_ms: int) -> Pool:
    """``pool`` under a new period rule: the current period is the one holding ``now_ms``
    (its numbers are kept; the next boundary resets them)."""
    if rule is None:
        return pool._replace(period=None, period_end_ms=None)
    return pool._replace(
        period=rule,
        period_start_ms=period_start(rule, now_ms),
        period_end_ms=next_boundary(rule, now_ms),
    )


def period_start(rule: PeriodRule, at_ms: int) -> int:
    """The start of the period holding ``at_ms`` (the last boundary at or before it)."""
    if rule.unit != "month":
        length = _DAY_MS * (7 if rule.unit == "week" else 1)
        return at_ms - (at_ms - rule.anchor_ms) % length
    months = _months_between(rule.anchor_ms, at_ms)
    while _month_boundary(rule.anchor_ms, months) > at_ms:
        months -= 1
    while _month_boundary(rule.anchor_ms, months + 1) <= at_ms:
        months += 1
    return _month_boundary(rule.anchor_ms, months)


def next_boundary(rule: PeriodRule, at_ms: int) -> int:
    """The first boundary strictly after ``at_ms``."""
    start = period_start(rule, at_ms)
    if rule.unit != "month":
        return start + _DAY_MS * (7 if rule.unit == "week" else 1)
    months = _months_between(rule.anchor_ms, start)
    while _month_boundary(rule.anchor_ms, months) <= start:
        months += 1
    return _month_boundary(rule.anchor_ms, months)


def _moment(ms: int) -> dt.datetime:
    return _EPOCH + dt.timedelta(milliseconds=ms)


def _ms(moment: dt.datetime) -> int:
    return (moment - _EPOCH) // dt.timedelta(milliseconds=1)


def _months_between(anchor_ms: int, at_ms: int) -> int:
    a, b = _moment(anchor_ms), _moment(at_ms)
    return (b.year - a.year) * 12 + (b.month - a.month)


def _month_boundary(anchor_ms: int, months: int) -> int:
    """The anchor moved ``months`` calendar months (day clamped to the month's last)."""
    anchor = _moment(anchor_ms)
    index = anchor.year * 12 + anchor.month - 1 + months
    year, month = divmod(index, 12)
    month += 1
    last_day = (dt.date(year + month // 12, month % 12 + 1, 1) - dt.timedelta(days=1)).day
    return _ms(anchor.replace(year=year, month=month, day=min(anchor.day, last_day)))


# --- limits and levels ----------------------------------------------------------------


class Limit(NamedTuple):
    """One limit on a device: ``headroom`` tokens left of ``base``; ``why`` at zero."""

    headroom: int
    base: int
    why: str


def pool_limit(pool: Pool) -> Limit | None:
    """The pool's limit under its policy; None for pay-as-you-go (never limited)."""
    if pool.policy == "payg":
        return None
    if pool.policy == "overage":
        headroom = max(pool.balance, 0) + pool.overage_cap - pool.overage
        return Limit(headroom, pool.allocation + pool.overage_cap, "overage_cap")
    return Limit(pool.balance, pool.allocation, "exhausted")


def cap_limit(cap: int | None, used: int) -> Limit | None:
    """A per-device cap within a shared pool: ``cap`` tokens per period."""
    return None if cap is None else Limit(cap - used, cap, "cap_reached")


# --- helpers ------------------------------------------------------------------------


def format_share(share: Fraction) -> str:
    """A share as the exact percentage operators write: ``Fraction(1, 2)`` -> ``"50%"``."""
    return f"{format_price(share * 100)}%"


def _details(**values: object) -> tuple[tuple[str, object], ...]:
    return tuple((k, v) for k, v in values.items() if v is not None)


def total(movements: Iterable[Movement], kind: MovementKind) -> int:
    """The tokens of the ``kind`` movements among ``movements``."""
    return sum(m.tokens for m in movements if m.kind == kind)
