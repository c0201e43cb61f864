"""From received bytes to a batch of decisions: verify, then charge. Pure, no I/O.

Two steps, so the gateway can run them as a pipeline:

1. :func:`verify` turns one received message into a :class:`~gateway.wire.UsageReport`
   or a :class:`~gateway.errors.Rejection`. It only reads the device registry and is
   safe to run on worker threads (Ed25519 verification releases the GIL).
2. :func:`charge_batch` applies the charging rule to a batch of verified reports, in
   order, against the current state, and returns everything the batch changes as
   values: the :class:`~gateway.ledger.LedgerWrite` to commit, the new device records,
   control messages and events. Nothing becomes visible until the caller has committed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, NamedTuple, Protocol, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from gateway.config import ThrottleStep
from gateway.economics import (
    Alert,
    Outcome,
    Pool,
    advance,
    after_debit,
    is_due,
    next_due_ms,
    pool_limit,
)
from gateway.economics import debit as debit_pool
from gateway.errors import Reason, Rejection
from gateway.ledger import Debit, HighMark, LedgerWrite
from gateway.metering import (
    Device,
    attributed_time,
    charge,
    debit,
    limit_level,
    next_control,
    raised_highs,
)
from gateway.packing import (
    DeviceSummary,
    pack_device,
    pack_pool,
    packed_device_pool,
    packed_public_key,
    pool_due_ms,
    summarize,
    summarize_device,
    unpack_device,
    unpack_pool,
)
from gateway.records import Records
from gateway.statement import HOUR_MS, Evidence
from gateway.views import Event
from gateway.wire import (
    MAX_UINT,
    USAGE_DOMAIN,
    ControlMessage,
    UsageReport,
    decode_envelope,
    decode_usage_body,
    is_device_id,
)

_V = TypeVar("_V")


@dataclass(frozen=True, slots=True)
class Rejected:
    """A message refused before charging; ``device`` is the topic's id as received."""

    device: str
    rejection: Rejection


class Loaded(NamedTuple):
    """What :meth:`Registry.load` found: devices not revoked, and the devices whose last
    control message the broker never confirmed."""

    active: int
    unconfirmed: list[str]


def _pool_of(device: Device) -> str:
    return device.pool


class Registry:
    """The gateway's in-memory view of committed state, read by both steps.

    Devices and pools are kept packed, the recently used ones unpacked as well
    (:class:`~gateway.records.Records`): about 250 bytes a device instead of 950.
    Mutated only by the gateway after a commit (:meth:`apply`), on the event loop.
    """

    def __init__(self) -> None:
        self._names: dict[str, str] = {}  # one object for equal strings, across records
        self.devices: Records[Device] = Records(pack_device, self._unpack_device)
        self.pools: Records[Pool] = Records(pack_pool, self._unpack_pool)
        self.members: dict[str, set[str]] = {}  # shared pool key -> its devices' ids
        self._due: dict[str, int] = {}  # pool key -> its next period boundary or expiry

    def _unpack_device(self, device_id: str, data: bytes) -> Device:
        return unpack_device(device_id, data, self._names)

    def _unpack_pool(self, key: str, data: bytes) -> Pool:
        return unpack_pool(key, data, self._names)

    def load(self, devices: dict[str, bytes], pools: dict[str, bytes]) -> Loaded:
        """Take packed records (:mod:`gateway.packing`) as the whole committed state."""
        self.devices.load(devices)
        self.pools.load(pools)
        self.members = {}
        active, unconfirmed = 0, []
        for device_id, summary in self.summaries():
            if summary.pool != device_id:
                self.members.setdefault(summary.pool, set()).add(device_id)
            if summary.control_unconfirmed:
                unconfirmed.append(device_id)
            active += not summary.revoked
        self._due = {}
        for key, data in pools.items():
            if (due := pool_due_ms(data)) is not None:
                self._due[key] = due
        return Loaded(active, unconfirmed)

    def summary(self, device_id: str) -> DeviceSummary | None:
        """The device's :class:`~gateway.packing.DeviceSummary` (None: no such device);
        the one read that is safe on worker threads."""
        return self.devices.peek(device_id, summarize_device, summarize)

    def public_keys(self) -> Iterator[tuple[str, bytes]]:
        """Every device's id and public key, unpacking none."""
        return self.devices.each(packed_public_key, lambda device: device.public_key)

    def summaries(self) -> Iterator[tuple[str, DeviceSummary]]:
        """Every device's id and :class:`~gateway.packing.DeviceSummary`, unpacking none."""
        return self.devices.each(summarize_device, summarize)

    def apply(
        self,
        devices: Mapping[str, Device],
        pools: Iterable[Pool] = (),
        packed: Mapping[str, tuple[Pool, bytes]] | None = None,
    ) -> None:
        """Make a committed batch's effects visible. ``packed`` (a committed write's
        :meth:`~gateway.ledger.LedgerWrite.packed_pools`) gives the packed form of those
        of ``pools`` it holds, the very objects, so that they are not packed again."""
        for device in devices.values():
            # Its pool as it was, read without unpacking it (a device charged early in a
            # busy fleet has often been packed away since: unpacking it again only to
            # read this cost 7 % of the loop at 100,000 devices, docs/performance.md).
            previous = self.devices.peek(device.id, packed_device_pool, _pool_of)
            if previous is not None and previous != device.pool:
                self.members.get(previous, set()).discard(device.id)
            if device.pool != device.id:
                self.members.setdefault(device.pool, set()).add(device.id)
            self.devices[device.id] = device
        for pool in pools:
            kept = packed.get(pool.key) if packed else None
            self.pools.put(pool.key, pool, kept[1] if kept and kept[0] is pool else None)
            if (due := next_due_ms(pool)) is None:
                self._due.pop(pool.key, None)
            else:
                self._due[pool.key] = due

    def due_pools(self, now_ms: int) -> list[str]:
        """The pools with a period boundary or a grant expiry by ``now_ms``."""
        return [key for key, due in self._due.items() if due <= now_ms]

    def pool_of(self, device: Device) -> Pool:
        """The pool ``device`` draws from."""
        return self.pools[device.pool]

    def members_of(self, key: str) -> set[str]:
        """The ids of the devices drawing from pool ``key``."""
        if key.startswith("@"):
            return self.members.get(key, set())
        return {key} if key in self.devices else set()


class RegistryView(Protocol):
    """What charging reads of the registry: committed state, or :class:`Staged`."""

    @property
    def devices(self) -> Mapping[str, Device]: ...

    @property
    def pools(self) -> Mapping[str, Pool]: ...

    def members_of(self, key: str) -> set[str]: ...


class Layered(Mapping[str, _V]):
    """A mapping that reads ``top`` first, then ``base``; only ``top`` is ever written."""

    __slots__ = ("base", "top")

    def __init__(self, base: Mapping[str, _V]) -> None:
        self.top: dict[str, _V] = {}
        self.base = base

    def __getitem__(self, key: str) -> _V:
        value = self.top.get(key)
        return self.base[key] if value is None else value

    def get(self, key: str, default: Any = None) -> Any:
        value = self.top.get(key)
        return self.base.get(key, default) if value is None else value

    def __contains__(self, key: object) -> bool:
        return key in self.top or key in self.base

    def __iter__(self) -> Iterator[str]:
        yield from self.top
        yield from (key for key in self.base if key not in self.top)

    def __len__(self) -> int:
        return len(self.base) + sum(key not in self.base for key in self.top)


class Staged:
    """The registry as the charge stage sees it: committed state plus the effects of the
    batches charged and not yet committed, so that batch N+1 is charged while N commits.

    Batches are staged and unstaged in the same order (commits are in order); what is
    staged is seen by nothing but :func:`charge_batch`. Device membership of pools only
    changes through admin operations, which wait until nothing is staged.
    """

    def __init__(self, committed: Registry) -> None:
        self.committed = committed
        self.devices: Layered[Device] = Layered(committed.devices)
        self.pools: Layered[Pool] = Layered(committed.pools)
        self.batches = 0  # staged, not yet unstaged

    def members_of(self, key: str) -> set[str]:
        return self.committed.members_of(key)

    def stage(self, result: BatchResult) -> None:
        """Make ``result`` (charged, not yet committed) the state the next batch sees."""
        self.devices.top.update(result.devices)
        self.pools.top.update(result.pools)
        self.batches += 1

    def unstage(self, result: BatchResult) -> None:
        """``result`` is committed and applied to the registry: drop what it staged,
        unless a later batch has staged a newer value since."""
        for layer, values in ((self.devices.top, result.devices), (self.pools.top, result.pools)):
            for key, value in values.items():
                if layer.get(key) is value:
                    del layer[key]
        self.batches -= 1


def verify(
    device_id: str | None, payload: bytes, registry: Registry, *, vouched_by: bytes | None = None
) -> UsageReport | Rejected:
    """Check one usage message received on the topic of ``device_id``.

    Order: the topic's id, the envelope (size, msgpack, shape), the device (known, not
    revoked), the signature, then the body and its ``d``. Never raises for bad input.
    ``vouched_by``: the key :func:`vouching_key` found these very bytes signed with; the
    signature is not checked again when that is the device's key (a device's key never
    changes: ids are never reused).
    """
    topic_id = device_id or ""
    if not is_device_id(device_id):
        return Rejected(topic_id[:64], Rejection(Reason.BAD_DEVICE_ID, "topic id"))
    envelope = decode_envelope(payload)
    if isinstance(envelope, Rejection):
        return Rejected(topic_id, envelope)
    device = registry.summary(topic_id)
    if device is None:
        return Rejected(topic_id, Rejection(Reason.UNKNOWN_DEVICE))
    if device.revoked:
        return Rejected(topic_id, Rejection(Reason.REVOKED_DEVICE))
    if vouched_by != device.public_key:  # None never equals a key
        # The key object is built each time, not kept: under a microsecond (a
        # verification takes about 60), where keeping it would cost 360 bytes a device.
        key = Ed25519PublicKey.from_public_bytes(device.public_key)
        if not envelope.verify(USAGE_DOMAIN, key):
            return Rejected(topic_id, Rejection(Reason.BAD_SIGNATURE))
    report = decode_usage_body(envelope.body)
    if isinstance(report, Rejection):
        return Rejected(topic_id, report)
    if report.device != topic_id:
        return Rejected(topic_id, Rejection(Reason.DEVICE_MISMATCH, f"d={report.device}"))
    return report


class KeyLookup(Protocol):
    """Public keys by device id (a dict, or gateway.keytable.KeyTable)."""

    def get(self, device_id: str, /) -> bytes | None: ...


def vouching_key(device_id: str | None, payload: bytes, keys: KeyLookup) -> bytes | None:
    """The key found for ``device_id`` in ``keys``, when ``payload`` is an envelope signed
    with it: the costly part of :func:`verify`, done where the registry is not
    (gateway.receiver). None for anything else, including a device without a key; never
    raises."""
    key = keys.get(device_id or "")
    if key is None:
        return None
    envelope = decode_envelope(payload)
    if isinstance(envelope, Rejection):
        return None
    # libsodium's stricter check: what it refuses, the gateway checks again with OpenSSL.
    return key if envelope.verifies_strictly(USAGE_DOMAIN, key) else None


@dataclass(frozen=True, slots=True)
class Pricing:
    """The charging parameters of the gateway's configuration."""

    prices: Mapping[str, Fraction]
    ladder: Sequence[ThrottleStep]
    device_clock_max_age_ms: int = 30 * 86_400_000


@dataclass(slots=True)
class BatchResult:
    """The effects of one batch, to commit then apply (all fields are new values)."""

    write: LedgerWrite = field(default_factory=LedgerWrite)
    devices: dict[str, Device] = field(default_factory=dict)
    pools: dict[str, Pool] = field(default_factory=dict)
    reset: set[str] = field(default_factory=set)  # pools whose period began anew
    reporters: dict[str, str] = field(default_factory=dict)  # pool -> last device debited
    # device -> the pool (this very value) its control message was last decided against
    decided: dict[str, Pool] = field(default_factory=dict)
    controls: list[ControlMessage] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    charged: int = 0  # reports that debited or raised a counter
    duplicates: int = 0  # valid reports that changed nothing
    rejected: list[Rejected] = field(default_factory=list)
    tokens: int = 0


def charge_batch(
    items: Sequence[UsageReport | Rejected],
    registry: RegistryView,
    pricing: Pricing,
    now_ms: int,
    payloads: Sequence[bytes] | None = None,
) -> BatchResult:
    """Charge ``items`` in order against ``registry`` without mutating it.

    ``payloads`` (the envelopes as received, one per item) are kept as statement
    evidence: per device, boot epoch and hour, the latest report that charged.
    """
    result = BatchResult()
    evidence: dict[tuple[str, int, int], Evidence] = {}
    for index, item in enumerate(items):
        if isinstance(item, Rejected):
            _reject(item, now_ms, result)
            continue
        at_ms = _charge_one(item, registry, pricing, now_ms, result)
        if at_ms is not None and payloads is not None:
            hour = at_ms - at_ms % HOUR_MS
            key = (item.device, item.boot, hour)
            if key not in evidence or evidence[key].n < item.number:
                evidence[key] = Evidence(item.device, item.boot, item.number, hour, payloads[index])
    result.write.evidence.extend(evidence.values())
    _settle_pools(result, registry, pricing, now_ms)
    return result


def pass_time(
    registry: Registry, pricing: Pricing, now_ms: int, keys: Iterable[str]
) -> BatchResult:
    """The effects of time on the pools ``keys``: grant expiries and period resets due by
    ``now_ms``, and the control messages they make necessary."""
    result = BatchResult()
    for key in keys:
        if key in registry.pools:
            _advanced_pool(key, registry, now_ms, result)
    _settle_pools(result, registry, pricing, now_ms)
    return result


def rebalance(
    registry: Registry, pricing: Pricing, now_ms: int, outcome: Outcome, why: str | None
) -> BatchResult:
    """The effects of an operator's change to one pool (``outcome``): its movements and
    alerts, and a control message for each device on it: always (with ``why``) when
    ``why`` is given, else only where the level changed."""
    result = BatchResult()
    pool = outcome.pool
    _record(outcome, result)
    if pool.key in result.reset:
        why = "period_reset"
    result.pools[pool.key] = pool
    for device_id in sorted(registry.members_of(pool.key)):
        device = registry.devices[device_id]
        reason = None if device.revoked else why
        result.devices[device_id] = _with_control(device, pool, pricing, now_ms, result, reason)
    result.write.devices.extend(result.devices.values())
    result.write.pools.append(pool)
    return result


def _advanced_pool(key: str, registry: RegistryView, now_ms: int, result: BatchResult) -> Pool:
    """Pool ``key`` as this batch has it, brought up to ``now_ms`` on first touch."""
    pool = result.pools.get(key)
    if pool is not None:
        return pool
    pool = registry.pools[key]
    if not is_due(pool, now_ms):  # nothing has expired or ended: the common case
        result.pools[key] = pool
        return pool
    outcome = advance(pool, now_ms)
    _record(outcome, result)
    result.pools[key] = outcome.pool
    return outcome.pool


def _record(outcome: Outcome, result: BatchResult) -> None:
    """Book ``outcome``'s movements and alerts into ``result``, and note a new period."""
    result.write.movements.extend(outcome.movements)
    for alert in outcome.alerts:
        result.events.append(alert_event(alert, outcome.pool, result.reporters.get(alert.pool)))
        if alert.kind == "period_reset":
            result.reset.add(alert.pool)


def alert_event(alert: Alert, pool: Pool, device: str | None) -> Event:
    """An economics alert as an operator event. ``device`` is the device whose report
    caused it; time-driven alerts name the pool's device, or none for a shared pool."""
    owner = device or ("" if pool.shared else pool.key)
    details = {"pool": pool.key, "account": pool.account, **dict(alert.details)}
    return Event(alert.kind, owner, alert.at_ms, details)


def _settle_pools(
    result: BatchResult, registry: RegistryView, pricing: Pricing, now_ms: int
) -> None:
    """After a batch's debits: alerts and top-ups per pool, then control messages for
    every device whose level may have changed (all of a pool's devices when the pool's
    own level changed or its period began anew)."""
    check: set[str] = {d for d in result.devices if d in registry.devices}
    for key, pool in list(result.pools.items()):
        outcome = after_debit(pool, now_ms, result.reporters.get(key))
        if outcome.pool is registry.pools[key]:
            del result.pools[key]  # touched by duplicates only: nothing to write or re-check
            continue
        _record(outcome, result)
        result.pools[key] = outcome.pool
        members = registry.members_of(key)
        if members <= check:  # a dedicated pool whose device reported, mostly
            continue
        before = limit_level(pool_limit(registry.pools[key]), pricing.ladder)
        after = limit_level(pool_limit(outcome.pool), pricing.ladder)
        if key in result.reset or before.key != after.key or outcome.movements:
            check.update(members)
    for device_id in sorted(check):
        device = result.devices.get(device_id) or registry.devices[device_id]
        pool = result.pools.get(device.pool) or registry.pools[device.pool]
        reset = device.pool in result.reset and not device.revoked
        if not reset and result.decided.get(device_id) is pool:
            continue  # decided against this very pool: the same decision again
        why = "period_reset" if reset else None
        result.devices[device_id] = _with_control(device, pool, pricing, now_ms, result, why)
    result.write.devices.extend(result.devices.values())
    result.write.pools.extend(result.pools.values())


def _charge_one(
    report: UsageReport, registry: RegistryView, pricing: Pricing, now_ms: int, result: BatchResult
) -> int | None:
    """Charge one report into ``result``; returns the time its usage is attributed to
    when it charged (raised a counter), else None."""
    device = result.devices.get(report.device) or registry.devices.get(report.device)
    if device is None or device.revoked:  # revoked or removed since verification
        reason = Reason.REVOKED_DEVICE if device else Reason.UNKNOWN_DEVICE
        _reject(Rejected(report.device, Rejection(reason)), now_ms, result)
        return None
    pool = _advanced_pool(device.pool, registry, now_ms, result)
    highs = device.highs_of(report.boot)
    outcome = charge(report, highs, pricing.prices)
    tokens = outcome.tokens
    if pool.used + tokens > MAX_UINT:
        # The ledger keeps 64-bit integers. A genuine report cannot get here (2**63 tokens);
        # a broken or hostile device can, and must be refused rather than stop the gateway.
        detail = f"used would pass {MAX_UINT} tokens"
        _reject(Rejected(device.id, Rejection(Reason.OUT_OF_RANGE, detail)), now_ms, result)
        return None
    for meter in outcome.unpriced:
        result.events.append(Event("unpriced_meter", device.id, now_ms, {"meter": meter}))
    if not outcome.lines:
        result.duplicates += 1
        result.devices[device.id] = device._replace(last_report_ms=now_ms)
        return None
    result.charged += 1
    result.tokens += tokens
    at_ms = attributed_time(report.device_time_ms, now_ms, pricing.device_clock_max_age_ms)
    pool, burn = debit_pool(pool, tokens)
    result.pools[pool.key] = pool
    result.reporters[pool.key] = device.id
    overage = burn.overage
    for line in reversed(outcome.lines):  # overage is booked on the last lines first
        line_overage = min(overage, line.tokens)
        overage -= line_overage
        result.write.highs.append(HighMark(device.id, report.boot, line.meter, line.to_units))
        result.write.debits.append(
            Debit(
                device.id, device.account, report.boot, line.meter, line.from_units,
                line.to_units, line.tokens, at_ms, now_ms, pool.key, line_overage,
            )
        )  # fmt: skip
    raised = {line.meter: line.to_units for line in outcome.lines}
    debited = debit(device, pool, tokens, now_ms, raised_highs(device, report.boot, raised))
    result.devices[device.id] = _with_control(debited, pool, pricing, now_ms, result)
    result.decided[device.id] = pool
    return at_ms


def _with_control(
    device: Device,
    pool: Pool,
    pricing: Pricing,
    now_ms: int,
    result: BatchResult,
    why: str | None = None,
) -> Device:
    control = next_control(device, pool, pricing.ladder, now_ms, why=why, force=why is not None)
    if control is None:
        return device
    result.controls.append(control)
    previous = device.control.state if device.control else "ok"
    result.events.append(transition_event(device.id, previous, control))
    return device._replace(control=control)


def transition_event(device: str, previous: str, control: ControlMessage) -> Event:
    """The event announcing a control change: ``throttle``, ``block`` or ``resume``."""
    kind = {"throttle": "throttle", "block": "block"}.get(control.state, "resume")
    details = {
        "from": previous,
        "state": control.state,
        "rate_permille": control.rate_permille,
        "balance": control.balance,
        "why": control.why,
        "seq": control.seq,
    }
    return Event(kind, device, control.time_ms, details)


def _reject(item: Rejected, now_ms: int, result: BatchResult) -> None:
    result.rejected.append(item)
    details = {"reason": item.rejection.reason.value, "detail": item.rejection.detail}
    result.events.append(Event("rejected", item.device, now_ms, details))
