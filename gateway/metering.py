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
from dataclasses import dataclass, replace
from fractions import Fraction

from gateway.config import ThrottleStep
from gateway.pricing import charged
from gateway.wire import ControlMessage, ControlState, UsageReport


@dataclass(frozen=True, slots=True)
class ChargeLine:
    """One meter's advance: cumulative ``from_units`` -> ``to_units`` costing ``tokens``."""

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


@dataclass(frozen=True, slots=True)
class Device:
    """A provisioned device and its allocation, as the ledger holds it.

    ``balance`` always equals ``allocation`` minus ``used`` (tokens debited in the current
    period; until periods exist, since provisioning). ``control`` is the last control
    message issued; ``control_sent`` the highest control ``n`` the broker has confirmed.
    ``highs`` holds ``H`` as sorted ``(boot, meter, high)`` triples: kept in the record
    itself, it costs about a third of a dict per device (memory is per device, times
    100,000).
    """

    id: str
    public_key: bytes
    account: str
    allocation: int
    used: int
    created_ms: int
    updated_ms: int
    revoked: bool = False
    last_report_ms: int | None = None
    control: ControlMessage | None = None
    control_sent: int = 0
    highs: tuple[tuple[int, str, int], ...] = ()

    @property
    def balance(self) -> int:
        return self.allocation - self.used

    def highs_of(self, boot: int) -> dict[str, int]:
        """``H`` per meter for one boot epoch."""
        return {meter: high for b, meter, high in self.highs if b == boot}


def raise_highs(device: Device, boot: int, updates: Mapping[str, int]) -> Device:
    """``device`` with ``H`` of epoch ``boot`` set to ``updates`` (meter -> new high)."""
    kept = [h for h in device.highs if h[0] != boot or h[1] not in updates]
    added = [(boot, sys.intern(meter), high) for meter, high in updates.items()]
    return replace(device, highs=tuple(sorted(kept + added)))


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


def decide_level(device: Device, ladder: Sequence[ThrottleStep]) -> Level:
    """The level a device should run at, from its balance share of the allocation (prepaid).

    Of the steps whose threshold the balance is at or under, the one with the lowest
    threshold wins (the lowest rate among equal thresholds), whatever the order of
    ``ladder``. Zero or less blocks; revoked devices are blocked.
    """
    if device.revoked:
        return Level("block", 0, "revoked")
    balance = device.balance
    if balance <= 0:
        return Level("block", 0, "exhausted")
    reached = [step for step in ladder if balance <= step.below * device.allocation]
    if not reached:
        return Level("ok", 1000, "ok")
    step = min(reached, key=lambda s: (s.below, s.rate_permille))
    return Level("throttle", step.rate_permille, "low_balance")


def next_control(
    device: Device,
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
    level = decide_level(device, ladder)
    last = device.control
    if last is not None and not force and (last.state, last.rate_permille) == level.key:
        return None
    reason = why if (why is not None and level.state == "ok") else level.why
    seq = last.seq + 1 if last is not None else 1
    return ControlMessage(
        device.id, seq, now_ms, level.state, level.rate_permille, device.balance, reason
    )


def debit(device: Device, tokens: int, now_ms: int) -> Device:
    """``device`` after a report debiting ``tokens`` (possibly 0) was accepted at ``now_ms``."""
    return replace(device, used=device.used + tokens, last_report_ms=now_ms, updated_ms=now_ms)


def credit(device: Device, tokens: int, now_ms: int) -> Device:
    """``device`` after a refill of ``tokens``: the allocation grows, so does the balance."""
    return replace(device, allocation=device.allocation + tokens, updated_ms=now_ms)


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
