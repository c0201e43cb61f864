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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from gateway.config import ThrottleStep
from gateway.errors import Reason, Rejection
from gateway.ledger import Debit, HighMark, LedgerWrite
from gateway.metering import Device, attributed_time, charge, debit, next_control, raise_highs
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


@dataclass(frozen=True, slots=True)
class Rejected:
    """A message refused before charging; ``device`` is the topic's id as received."""

    device: str
    rejection: Rejection


class Registry:
    """The gateway's in-memory view of committed state, read by both steps.

    Mutated only by the gateway after a commit (:meth:`apply`), on the event loop.
    """

    def __init__(self) -> None:
        self.devices: dict[str, Device] = {}

    @staticmethod
    def key(device: Device) -> Ed25519PublicKey:
        """The device's public key object. Built each time, not cached: building costs
        under a microsecond (a verification about 60), a cached key object about 360
        bytes per device."""
        return Ed25519PublicKey.from_public_bytes(device.public_key)

    def apply(self, devices: Mapping[str, Device]) -> None:
        """Make a committed batch's effects visible."""
        self.devices.update(devices)


def verify(device_id: str | None, payload: bytes, registry: Registry) -> UsageReport | Rejected:
    """Check one usage message received on the topic of ``device_id``.

    Order: the topic's id, the envelope (size, msgpack, shape), the device (known, not
    revoked), the signature, then the body and its ``d``. Never raises for bad input.
    """
    topic_id = device_id or ""
    if not is_device_id(device_id):
        return Rejected(topic_id[:64], Rejection(Reason.BAD_DEVICE_ID, "topic id"))
    envelope = decode_envelope(payload)
    if isinstance(envelope, Rejection):
        return Rejected(topic_id, envelope)
    device = registry.devices.get(topic_id)
    if device is None:
        return Rejected(topic_id, Rejection(Reason.UNKNOWN_DEVICE))
    if device.revoked:
        return Rejected(topic_id, Rejection(Reason.REVOKED_DEVICE))
    if not envelope.verify(USAGE_DOMAIN, registry.key(device)):
        return Rejected(topic_id, Rejection(Reason.BAD_SIGNATURE))
    report = decode_usage_body(envelope.body)
    if isinstance(report, Rejection):
        return Rejected(topic_id, report)
    if report.device != topic_id:
        return Rejected(topic_id, Rejection(Reason.DEVICE_MISMATCH, f"d={report.device}"))
    return report


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
    controls: list[ControlMessage] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    charged: int = 0  # reports that debited or raised a counter
    duplicates: int = 0  # valid reports that changed nothing
    rejected: list[Rejected] = field(default_factory=list)
    tokens: int = 0


def charge_batch(
    items: Sequence[UsageReport | Rejected], registry: Registry, pricing: Pricing, now_ms: int
) -> BatchResult:
    """Charge ``items`` in order against ``registry`` without mutating it."""
    result = BatchResult()
    for item in items:
        if isinstance(item, Rejected):
            _reject(item, now_ms, result)
        else:
            _charge_one(item, registry, pricing, now_ms, result)
    result.write.devices.extend(result.devices.values())
    return result


def _charge_one(
    report: UsageReport, registry: Registry, pricing: Pricing, now_ms: int, result: BatchResult
) -> None:
    device = result.devices.get(report.device) or registry.devices.get(report.device)
    if device is None or device.revoked:  # revoked or removed since verification
        reason = Reason.REVOKED_DEVICE if device else Reason.UNKNOWN_DEVICE
        _reject(Rejected(report.device, Rejection(reason)), now_ms, result)
        return
    highs = device.highs_of(report.boot)
    outcome = charge(report, highs, pricing.prices)
    if device.used + outcome.tokens > MAX_UINT:
        # The ledger keeps 64-bit integers. A genuine report cannot get here (2**63 tokens);
        # a broken or hostile device can, and must be refused rather than stop the gateway.
        detail = f"used would pass {MAX_UINT} tokens"
        _reject(Rejected(device.id, Rejection(Reason.OUT_OF_RANGE, detail)), now_ms, result)
        return
    for meter in outcome.unpriced:
        result.events.append(Event("unpriced_meter", device.id, now_ms, {"meter": meter}))
    if not outcome.lines:
        result.duplicates += 1
        result.devices[device.id] = replace(device, last_report_ms=now_ms)
        return
    result.charged += 1
    result.tokens += outcome.tokens
    at_ms = attributed_time(report.device_time_ms, now_ms, pricing.device_clock_max_age_ms)
    for line in outcome.lines:
        result.write.highs.append(HighMark(device.id, report.boot, line.meter, line.to_units))
        result.write.debits.append(
            Debit(
                device.id,
                device.account,
                report.boot,
                line.meter,
                line.from_units,
                line.to_units,
                line.tokens,
                at_ms,
                now_ms,
            )
        )
    raised = raise_highs(device, report.boot, {line.meter: line.to_units for line in outcome.lines})
    result.devices[device.id] = _with_control(
        debit(raised, outcome.tokens, now_ms), pricing, now_ms, result
    )


def _with_control(device: Device, pricing: Pricing, now_ms: int, result: BatchResult) -> Device:
    control = next_control(device, pricing.ladder, now_ms)
    if control is None:
        return device
    result.controls.append(control)
    previous = device.control.state if device.control else "ok"
    result.events.append(transition_event(device.id, previous, control))
    return replace(device, control=control)


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
