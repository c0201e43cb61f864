"""Device and pool records packed into bytes: how the registry keeps the devices it is not
using at the moment, and how the ledger hands it 100,000 of them at start-up.

A record built of Python objects costs about 950 bytes a device (a device, its control
message, its pool and grant, each with its own integers and strings); the same record
packed with msgpack costs about 250. The registry (:mod:`gateway.records`) keeps every
record packed and unpacks those in use; the SQLite ledger packs rows straight from its
tables, so a start-up builds no record objects at all.

The packed forms are lists in field order:

- a device: its ``devices`` row without the id (the record's key), then ``H`` as a list
  of ``[boot, meter, high]`` (see :data:`DEVICE_FIELDS`);
- a pool: :func:`pack_pool`, also the ``state`` column of the ``pools`` table.

Pure: no I/O. Unpacking trusts what it unpacks (control messages are not checked
again): records are packed by this gateway from records it built, or by the ledger from
rows it checked as it loaded them.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from typing import Any, NamedTuple

import msgpack

from gateway.economics import (
    GRANT_KINDS,
    POLICIES,
    GrantKind,
    GrantState,
    PeriodRule,
    Policy,
    Pool,
    TopUpRule,
    earliest_due_ms,
)
from gateway.metering import Device
from gateway.wire import PROTOCOL_VERSION, checked_control

# The ``devices`` columns, in the order of a device row and of a packed device (which
# leaves out ``id`` and adds ``highs``).
DEVICE_FIELDS = (
    "id", "public_key", "account", "pool", "used", "created_ms", "updated_ms", "revoked",
    "last_report_ms", "ctl_n", "ctl_t", "ctl_s", "ctl_r", "ctl_bal", "ctl_why", "ctl_sent",
    "cap", "period_ms",
)  # fmt: skip

_POLICY: dict[str, Policy] = {p: p for p in POLICIES}
_KIND: dict[str, GrantKind] = {k: k for k in GRANT_KINDS}


def device_row(device: Device) -> tuple[Any, ...]:
    """A :class:`Device` as a ``devices`` row (:data:`DEVICE_FIELDS`)."""
    c = device.control
    control = (c.seq, c.time_ms, c.state, c.rate_permille, c.balance, c.why) if c else (None,) * 6
    return (
        device.id, device.public_key, device.account, device.pool, device.used,
        device.created_ms, device.updated_ms, int(device.revoked), device.last_report_ms,
        *control, device.control_sent, device.cap, device.period_ms,
    )  # fmt: skip


def pack_device(device: Device) -> bytes:
    """``device`` packed (its id is the key it is kept under)."""
    return pack_device_row(device_row(device)[1:], device.highs)


def pack_device_row(row: Sequence[Any], highs: Sequence[Sequence[Any]]) -> bytes:
    """A ``devices`` row without its id, and the device's ``H`` as ``(boot, meter,
    high)`` triples, packed."""
    packed: bytes = msgpack.packb([*row, highs])
    return packed


def unpack_device(device_id: str, data: bytes, names: dict[str, str]) -> Device:
    """The inverse of :func:`pack_device`. ``names`` shares equal strings (accounts, pool
    keys, meters, control states and reasons) between records; equal time stamps within
    a record share one object."""
    (key, account, pool, used, created, updated, revoked, last, *ctl) = msgpack.unpackb(data)
    *ctl, sent, cap, period_ms, highs = ctl
    account = names.setdefault(account, account)
    pool = device_id if pool == device_id else names.setdefault(pool, pool)
    stamps = {created: created}
    updated = stamps.setdefault(updated, updated)
    if last is not None:
        last = stamps.setdefault(last, last)
    control = None
    if ctl[0] is not None:
        n, t, state, r, bal, why = ctl
        t = stamps.setdefault(t, t)
        state, why = _shared(names, state), _shared(names, why)
        control = checked_control((device_id, n, t, state, r, bal, why, PROTOCOL_VERSION))
    marks = tuple((b, names.setdefault(m, m), h) for b, m, h in highs)
    return Device(
        device_id, bytes(key), account, pool, used, created, updated, bool(revoked), last,
        control, sent, marks, cap, period_ms,
    )  # fmt: skip


class DeviceSummary(NamedTuple):
    """What start-up needs of a packed device, read without building it."""

    public_key: bytes
    account: str
    pool: str
    revoked: bool
    control_unconfirmed: bool  # its last control message was never confirmed by the broker


def summarize_device(data: bytes) -> DeviceSummary:
    """The :class:`DeviceSummary` of a packed device."""
    fields = msgpack.unpackb(data)
    seq, sent = fields[8], fields[14]
    unconfirmed = seq is not None and seq > sent
    return DeviceSummary(fields[0], fields[1], fields[2], bool(fields[6]), unconfirmed)


_KEY_AT = b"\xdc\x00\x12\xc4\x20"  # a list of 18 (array 16), then 32 bytes (bin 8)


def packed_public_key(data: bytes) -> bytes:
    """The public key of a packed device, sliced from where it always is (the first
    field, 32 bytes): a start-up hands 100,000 of them to the receiver."""
    if data.startswith(_KEY_AT):
        return data[5:37]
    key: bytes = msgpack.unpackb(data)[0]  # not where expected: read it the long way
    return key


def packed_device_pool(data: bytes) -> str:
    """The pool key of a packed device, without building the device."""
    pool: str = msgpack.unpackb(data)[2]
    return pool


def summarize(device: Device) -> DeviceSummary:
    """The :class:`DeviceSummary` of a device record."""
    control = device.control
    unconfirmed = control is not None and control.seq > device.control_sent
    return DeviceSummary(
        device.public_key, device.account, device.pool, device.revoked, unconfirmed
    )


def pack_pool(pool: Pool) -> bytes:
    """A :class:`Pool` as compact msgpack (a list in field order; exact integers and
    fractions): thousands are written per second and 100,000 read at start-up."""
    period = pool.period
    topup = pool.topup
    packed: bytes = msgpack.packb([
        pool.key, pool.account, pool.policy, pool.overage_cap,
        None if period is None else [period.unit, period.anchor_ms, period.tokens,
                                     period.rollover_cap],
        pool.period_start_ms, pool.period_end_ms, pool.allocation, pool.used, pool.settled,
        pool.forfeited, pool.overage,
        [[g.seq, g.kind, g.tokens, g.remaining, g.priority, g.expires_ms, g.created_ms]
         for g in pool.grants],
        [[t.numerator, t.denominator] for t in pool.thresholds],
        [[t.numerator, t.denominator] for t in pool.fired],
        None if topup is None else [topup.floor, topup.tokens],
        pool.topup_armed, pool.next_seq,
    ])  # fmt: skip
    return packed


def unpack_pool(key: str, data: bytes, names: dict[str, str]) -> Pool:
    """The inverse of :func:`pack_pool`, for the pool kept under ``key``. ``names`` shares
    equal strings (shared pool keys, accounts) between records: 100,000 copies of
    ``"acme"`` cost 5 MB. A dedicated pool's key is its device's id: ``key`` itself, not
    one more entry in ``names``."""
    (stored, account, policy, cap, period, start, end, allocation, used, settled, forfeited,
     overage, grants, thresholds, fired, topup, armed, seq) = msgpack.unpackb(data)  # fmt: skip
    if stored != key:
        raise ValueError(f"pool {stored!r} kept under {key!r}")
    return Pool(
        key, names.setdefault(account, account),
        _POLICY[policy], cap,
        None if period is None else PeriodRule(*period), start, end, allocation, used,
        settled, forfeited, overage,
        tuple(GrantState(g[0], _KIND[g[1]], *g[2:]) for g in grants),
        tuple(Fraction(n, d) for n, d in thresholds), tuple(Fraction(n, d) for n, d in fired),
        None if topup is None else TopUpRule(*topup), armed, seq,
    )  # fmt: skip


def pool_due_ms(data: bytes) -> int | None:
    """When a packed pool next has a period boundary or a grant expiry (see
    :func:`~gateway.economics.next_due_ms`), read without building it."""
    fields = msgpack.unpackb(data)
    return earliest_due_ms(fields[6], (grant[5] for grant in fields[12]))


def _shared(names: dict[str, str], value: Any) -> Any:
    """``value`` as the one object in ``names`` equal to it (None stays None)."""
    return value if value is None else names.setdefault(value, value)
