"""The pure metering core: the charging rule, debits and control decisions.

No I/O and no clock: time comes in as ``now_ms``. Every function returns a decision as
a value (a :class:`Charge`, a new :class:`Device`, a :class:`ControlMessage` or None)
and leaves its inputs untouched, so the gateway can compute a whole batch, commit it,
and only then make it visible.

Charging rule (contract §4): for each (device, boot epoch, meter) the ledger keeps ``H``,
the highest cumulative value charged for. A report value ``c > H`` debits
``charged(c) - charged(H)`` and raises ``H`` to ``c``; ``c <= H`` debits nothing. A meter
with no price debits nothing and leaves ``H`` alone.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import NamedTuple

from gateway.config import ThrottleStep
from gateway.economics import Limit, Pool, cap_limit, pool_limit
from gateway.pricing import charged
from gateway.wire import ControlMessage, ControlState, UsageReport


class ChargeLine(NamedTuple):
    """One meter's advance: cumulative ``from_units`` -> ``to_units`` costing ``tokens``.
    (A named tuple, as are the other small values built for every report: a fifth of a
    frozen dataclass's cost to build.)"""

    meter: str
    from_units: int
    to_units: int
    tokens: int


@dataclass(frozen=True, slots=True)
class Charge:
    """What one report debits. Empty ``lines`` means a duplicate, replay or late report."""

    lines: tuple[ChargeLine, ...]
    unpriced: tuple[str, ...] = ()

    @property
    def tokens(self) -> int:
        return sum(line.tokens for line in self.lines)


def charge(report: UsageReport, highs: Mapping[str, int], prices: Mapping[str, Fraction]) -> Charge:
    """Apply the charging rule to ``report`` given ``highs`` (meter -> H) of its boot epoch."""
    lines: list[ChargeLine] = []
    unpriced: list[str] = []
    for meter, count in sorted(report.counters.items()):
        price = prices.get(meter)
        if price is None:
            if count > 0:
                unpriced.append(meter)
            continue
        high = highs.get(meter, 0)
        if count > high:
            lines.append(
                ChargeLine(meter, high, count, charged(count, price) - charged(high, price))
            )
    return Charge(tuple(lines), tuple(unpriced))


class Device(NamedTuple):
    """A provisioned device, as the ledger holds it.

    The device draws from the pool ``pool`` (its dedicated allocation, key = its id, or
    its account's shared pool, see :mod:`gateway.economics`), optionally limited by
    ``cap`` tokens per period of that pool. ``used`` counts the tokens it was debited in
    the pool's period that began at ``period_ms`` (older periods count as 0: see
    :func:`used_now`). ``control`` is the last control message issued; ``control_sent``
    the highest control ``n`` the broker has confirmed. ``highs`` holds ``H`` as sorted
    ``(boot, meter, high)`` triples: kept in the record itself, it costs about a third of
    a dict per device (memory is per device, times 100,000).

    A named tuple, like :class:`~gateway.economics.Pool`: as immutable as a frozen
    dataclass, and a changed copy (``_replace``, once or twice per report) costs about a
    third as much to build (1.6 against 5.6 µs, docs/performance.md).
    """

    id: str
    public_key: bytes
    account: str
    pool: str
    used: int
    created_ms: int
    updated_ms: int
    revoked: bool = False
    last_report_ms: int | None = None
    control: ControlMessage | None = None
    control_sent: int = 0
    highs: tuple[tuple[int, str, int], ...] = ()
    cap: int | None = None
    period_ms: int = 0

    def highs_of(self, boot: int) -> dict[str, int]:
        """``H`` per meter for one boot epoch."""
        return {meter: high for b, meter, high in self.highs if b == boot}


def used_now(device: Device, pool: Pool) -> int:
    """Tokens ``device`` was debited in ``pool``'s current period."""
    return device.used if device.period_ms == pool.period_start_ms else 0


def device_balance(device: Device, pool: Pool) -> int:
    """The tokens left to the device: its pool's balance, or less under a per-device cap
    (whichever limit binds first)."""
    if device.cap is None:
        return pool.balance
    return min(pool.balance, device.cap - used_now(device, pool))


def raised_highs(
    device: Device, boot: int, updates: Mapping[str, int]
) -> tuple[tuple[int, str, int], ...]:
    """``device.highs`` with ``H`` of epoch ``boot`` set to ``updates``."""
    kept = [h for h in device.highs if h[0] != boot or h[1] not in updates]
    added = [(boot, sys.intern(meter), high) for meter, high in updates.items()]
    return tuple(sorted(kept + added))


@dataclass(frozen=True, slots=True)
class Level:
    """The permitted consumption a device is told: state, rate per mille and reason."""

    state: ControlState
    rate_permille: int
    why: str

    @property
    def key(self) -> tuple[str, int]:
        """What a device acts on: a change of it takes a new control message."""
        return (self.state, self.rate_permille)


OK = Level("ok", 1000, "ok")


def limit_level(limit: Limit | None, ladder: Sequence[ThrottleStep]) -> Level:
    """The level one limit allows: ``block`` with the limit's reason when no headroom is
    left; else the ladder on the headroom's share of the limit's base.

    Of the steps whose threshold the share is at or under, the one with the lowest
    threshold wins (the lowest rate among equal thresholds), whatever the order of
    ``ladder``.
    """
    if limit is None:
        return OK
    headroom, base = limit.headroom, limit.base
    if headroom <= 0:
        return Level("block", 0, limit.why)
    # headroom <= below * base, in integers: Fraction arithmetic here cost more than
    # everything else in charging a report.
    reached = [
        step for step in ladder if headroom * step.below.denominator <= step.below.numerator * base
    ]
    if not reached:
        return OK
    step = min(reached, key=lambda s: (s.below, s.rate_permille))
    return Level("throttle", step.rate_permille, "low_balance")


def decide_level(device: Device, pool: Pool, ladder: Sequence[ThrottleStep]) -> Level:
    """The level a device should run at: the most restrictive of its pool's limit (per the
    pool's policy) and its own cap. Revoked devices are blocked."""
    if device.revoked:
        return Level("block", 0, "revoked")
    shared = limit_level(pool_limit(pool), ladder)
    if device.cap is None:  # most devices: no cap, nothing more to weigh (twice a report)
        return shared
    own = limit_level(cap_limit(device.cap, used_now(device, pool)), ladder)
    return own if own.rate_permille < shared.rate_permille else shared  # ties: the pool's


def next_control(
    device: Device,
    pool: Pool,
    ladder: Sequence[ThrottleStep],
    now_ms: int,
    *,
    why: str | None = None,
    force: bool = False,
) -> ControlMessage | None:
    """The control message to send now, or None when the device's level is unchanged.

    A new message takes the next sequence number. ``force`` issues one even when the
    level is the same (after a refill: the device learns its new balance); ``why``
    overrides the reason code for an ``ok`` level (``refill``, ``provisioned``).
    """
    level = decide_level(device, pool, ladder)
    last = device.control
    if last is not None and not force and (last.state, last.rate_permille) == level.key:
        return None
    reason = why if (why is not None and level.state == "ok") else level.why
    seq = last.seq + 1 if last is not None else 1
    return ControlMessage(
        device.id, seq, now_ms, level.state, level.rate_permille,
        device_balance(device, pool), reason,
    )  # fmt: skip


def debit(
    device: Device,
    pool: Pool,
    tokens: int,
    now_ms: int,
    highs: tuple[tuple[int, str, int], ...] | None = None,
) -> Device:
    """``device`` after a report debiting ``tokens`` (possibly 0) from ``pool`` (its pool,
    already advanced to ``now_ms``) was accepted at ``now_ms``; with ``highs``, its new
    ``H`` too (one copy of the record rather than two: this runs for every report)."""
    return device._replace(
        used=used_now(device, pool) + tokens,
        period_ms=pool.period_start_ms,
        last_report_ms=now_ms,
        updated_ms=now_ms,
        highs=device.highs if highs is None else highs,
    )


def attributed_time(device_time_ms: int, received_ms: int, max_age_ms: int) -> int:
    """When usage counts as having happened (for usage queries, not for charging).

    The device clock when plausible: not ahead of receipt by more than five minutes and
    not older than ``max_age_ms`` (a device that was offline reports its usage at the
    time it occurred). Otherwise the receipt time: a device with a broken clock cannot
    move its usage into another period.
    """
    if received_ms - max_age_ms <= device_time_ms <= received_ms + 300_000:
        return device_time_ms
    return received_ms
