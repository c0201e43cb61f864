"""A simulated device: meters that accrue consumption, signed reports, control messages.

Pure: no I/O and no clock. Time comes in as arguments (``advance(seconds)``,
``report(now_ms)``), so a test drives a device exactly, the way trio's injectable clock
drives a scheduler.

Accrual is exact. Each meter keeps a :class:`~fractions.Fraction` remainder and adds only
whole units to its cumulative counter, so ten ``advance(0.1)`` at 20 units/s count exactly
20 units, however the time is sliced. A float is taken at its shortest decimal spelling
(``0.1`` is one tenth, not the binary float just above it).

A device obeys the last control message it applied (contract §5): it consumes at
``rate_permille / 1000`` of its nominal rate, nothing at all when blocked, and drops a
control message that does not verify, names another device, or is not newer than the last
one applied.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Mapping
from dataclasses import asdict
from enum import StrEnum
from fractions import Fraction
from typing import Any, Final, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gateway.errors import Rejection
from gateway.wire import (
    ControlMessage,
    UsageReport,
    decode_control,
    is_device_id,
    is_meter_name,
    sign_usage,
)

Rate = int | float | Fraction | str
"""Units per second, or seconds: anything :func:`exact` turns into a Fraction."""

T = TypeVar("T")

DEFAULT_RATES: Final[Mapping[str, Rate]] = {"api_calls": 20, "gpu_seconds": 1}


def exact(value: Rate) -> Fraction:
    """``value`` as an exact Fraction; a float by its shortest decimal spelling (0.1 -> 1/10).

    Raises ValueError for NaN, infinities and strings that are not numbers.
    """
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"not a finite number: {value!r}")
        return Fraction(repr(value))
    return Fraction(value)


class ControlOutcome(StrEnum):
    """What :meth:`SimDevice.apply_control` did with a control payload."""

    APPLIED = "applied"
    REJECTED = "rejected"  # not a control envelope, or the gateway's signature does not verify
    OTHER_DEVICE = "other_device"  # verified, but addressed to another device
    STALE = "stale"  # sequence not above the last applied (a re-publish or a replay)


class SimDevice:
    """One simulated device: identity, meters, counters for the current boot epoch.

    ``rates`` are nominal units per second per meter. ``step`` (0: off) makes
    :meth:`step_crossed` true once a counter passes a multiple of it since the last report.
    Raises ValueError for a bad device id, meter name, negative rate or negative step.
    """

    def __init__(
        self, device_id: str, key: Ed25519PrivateKey, rates: Mapping[str, Rate], *, step: int = 0
    ) -> None:
        if not is_device_id(device_id):
            raise ValueError(f"bad device id {device_id!r}")
        if step < 0:
            raise ValueError(f"step must be 0 (off) or positive, got {step!r}")
        self.device_id = device_id
        self.key = key
        self.rates = _checked_rates(rates)
        self.step = step
        self.boot = 0
        self.number = 0
        self.counters = dict.fromkeys(self.rates, 0)
        self.remainders = dict.fromkeys(self.rates, Fraction(0))
        self.reported = dict.fromkeys(self.rates, 0)  # the counters as of the last report
        self.control: ControlMessage | None = None  # the last control message applied
        self.last_report = b""  # the envelope of the latest report of this epoch
        self.tails: list[bytes] = []  # the last report of each of the two previous epochs

    def __repr__(self) -> str:
        return f"SimDevice({self.device_id!r}, b={self.boot}, n={self.number}, {self.counters})"

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.key.public_key()

    @property
    def permille(self) -> int:
        """The permitted rate, per mille of nominal: 1000 until a control message says else."""
        return 1000 if self.control is None else self.control.rate_permille

    @property
    def state(self) -> str:
        """``ok``, ``throttle`` or ``block``, from the last control message applied."""
        return "ok" if self.control is None else self.control.state

    def advance(self, seconds: Rate) -> None:
        """Accrue ``seconds`` of consumption at the permitted rate; raises ValueError if < 0."""
        elapsed = exact(seconds)
        if elapsed < 0:
            raise ValueError(f"time runs forward only, got {seconds!r} s")
        share = elapsed * Fraction(self.permille, 1000)
        for meter, rate in self.rates.items():
            total = self.remainders[meter] + rate * share
            whole = math.floor(total)
            self.counters[meter] += whole
            self.remainders[meter] = total - whole

    def report(self, now_ms: int) -> bytes:
        """The next usage report (``n`` + 1) of the current counters, as signed envelope bytes."""
        self.number += 1
        body = UsageReport(self.device_id, self.boot, self.number, now_ms, dict(self.counters))
        self.reported = dict(self.counters)
        self.last_report = sign_usage(body, self.key)
        return self.last_report

    def step_crossed(self) -> bool:
        """True when a counter passed a multiple of ``step`` since the last report."""
        if self.step <= 0:
            return False
        return any(
            count // self.step > self.reported.get(meter, 0) // self.step
            for meter, count in self.counters.items()
        )

    def apply_control(self, payload: bytes, gateway_key: Ed25519PublicKey) -> ControlOutcome:
        """Verify ``payload`` with the gateway's key and obey it if it is new and ours."""
        message = decode_control(payload, gateway_key)
        if isinstance(message, Rejection):
            return ControlOutcome.REJECTED
        if message.device != self.device_id:
            return ControlOutcome.OTHER_DEVICE
        if self.control is not None and message.seq <= self.control.seq:
            return ControlOutcome.STALE
        self.control = message
        return ControlOutcome.APPLIED

    def factory_reset(self) -> None:
        """Start a new boot epoch: counters from zero, ``n`` from zero; control state is kept.

        The old epoch's last report is kept as a *tail* and re-sent on every reconnect
        (see docs/protocol.md): if a broker crash lost it, nothing else would carry it.
        """
        if self.last_report:
            self.tails = [*self.tails[-1:], self.last_report]
            self.last_report = b""
        self.boot += 1
        self.number = 0
        self.counters = dict.fromkeys(self.rates, 0)
        self.remainders = dict.fromkeys(self.rates, Fraction(0))
        self.reported = dict.fromkeys(self.rates, 0)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able snapshot of everything the device keeps; the private key as hex."""
        return {
            "id": self.device_id,
            "key": self.key.private_bytes_raw().hex(),
            "rates": {meter: str(rate) for meter, rate in self.rates.items()},
            "step": self.step,
            "boot": self.boot,
            "number": self.number,
            "counters": dict(self.counters),
            "remainders": {meter: str(rest) for meter, rest in self.remainders.items()},
            "reported": dict(self.reported),
            "control": None if self.control is None else asdict(self.control),
            "last_report": self.last_report.hex(),
            "tails": [tail.hex() for tail in self.tails],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SimDevice:
        """Rebuild a device from :meth:`to_dict`; raises ValueError when ``data`` is not one."""
        try:
            key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(data["key"]))
            device = cls(data["id"], key, data["rates"], step=int(data["step"]))
            device.boot, device.number = _uint(data["boot"]), _uint(data["number"])
            device.counters = _meter_map(device.rates, data["counters"], _uint)
            device.remainders = _meter_map(device.rates, data["remainders"], Fraction)
            device.reported = _meter_map(device.rates, data["reported"], _uint)
            control = data["control"]
            device.control = None if control is None else ControlMessage(**control)
            device.last_report = bytes.fromhex(data.get("last_report", ""))
            device.tails = [bytes.fromhex(tail) for tail in data.get("tails", [])]
        except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
            raise ValueError(f"not a saved device: {type(exc).__name__}: {exc}") from None
        return device


def make_devices(
    count: int,
    seed: int = 0,
    *,
    rates: Mapping[str, Rate] = DEFAULT_RATES,
    step: int = 0,
    id_prefix: str = "sim",
) -> list[SimDevice]:
    """``count`` devices named ``{id_prefix}-0000``..., the same for the same ``seed``.

    Each private key is ``sha256(f"tokenwell-sim/{seed}/{index}")``; each device's nominal
    rates are ``rates`` times a seeded factor between 0.5 and 2, so the fleet is varied.
    """
    rng = random.Random(seed)
    devices = []
    for index in range(count):
        secret = hashlib.sha256(f"tokenwell-sim/{seed}/{index}".encode()).digest()
        factor = Fraction(rng.randint(5, 20), 10)
        scaled = {meter: exact(rate) * factor for meter, rate in rates.items()}
        key = Ed25519PrivateKey.from_private_bytes(secret)
        devices.append(SimDevice(f"{id_prefix}-{index:04d}", key, scaled, step=step))
    return devices


def _checked_rates(rates: Mapping[str, Rate]) -> dict[str, Fraction]:
    checked = {}
    for meter, rate in rates.items():
        if not is_meter_name(meter):
            raise ValueError(f"bad meter name {meter!r}")
        checked[meter] = exact(rate)
        if checked[meter] < 0:
            raise ValueError(f"meter {meter}: negative rate {rate!r}")
    return checked


def _uint(value: object) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(f"want a non-negative integer, got {value!r}")
    return value


def _meter_map(
    meters: Mapping[str, object], values: object, parse: Callable[[Any], T]
) -> dict[str, T]:
    """``values`` parsed per meter; exactly the device's meters, else ValueError."""
    if not isinstance(values, dict) or set(values) != set(meters):
        raise ValueError(f"want a value for each of {sorted(meters)}")
    return {meter: parse(values[meter]) for meter in meters}
