"""The simulated device, pure: accrual, control, reports, reset, serialisation."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from device_sim.device import ControlOutcome, SimDevice, exact, make_devices
from gateway.errors import Rejection
from gateway.wire import ControlMessage, ControlState, UsageReport, decode_usage, sign_control

GATEWAY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
DEVICE_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))


def device(rates: dict[str, int | str] | None = None, step: int = 0) -> SimDevice:
    return SimDevice("dev-1", DEVICE_KEY, rates or {"api_calls": 20, "gpu_seconds": 1}, step=step)


def control(
    seq: int,
    state: ControlState = "ok",
    rate: int = 1000,
    device_id: str = "dev-1",
    key: Ed25519PrivateKey = GATEWAY,
) -> bytes:
    message = ControlMessage(device_id, seq, 1_700_000_000_000, state, rate, 100, "test")
    return sign_control(message, key)


# --- accrual ---------------------------------------------------------------------------


def test_floats_count_at_their_decimal_value() -> None:
    """Ten slices of 0.1 s at 20 units/s are exactly 20 units, not 19."""
    sim = device()
    for _ in range(10):
        sim.advance(0.1)
    assert sim.counters == {"api_calls": 20, "gpu_seconds": 1}


def test_fractional_units_carry_over_between_advances() -> None:
    """At 1/3 unit per second, nothing is counted until a whole unit has accrued."""
    sim = device({"gpu_seconds": "1/3"})
    sim.advance(2)
    assert sim.counters == {"gpu_seconds": 0}
    sim.advance(1)
    assert sim.counters == {"gpu_seconds": 1}


@given(
    rate=st.fractions(min_value=0, max_value=1000, max_denominator=100),
    slices=st.lists(st.fractions(min_value=0, max_value=10, max_denominator=1000), max_size=40),
)
def test_slicing_time_never_changes_the_total(rate: Fraction, slices: list[Fraction]) -> None:
    """However time is sliced, the counter is floor(rate x total time)."""
    sim = SimDevice("dev-1", DEVICE_KEY, {"units": rate})
    for elapsed in slices:
        sim.advance(elapsed)
    assert sim.counters["units"] == math.floor(rate * sum(slices, Fraction(0)))


def test_time_runs_forward_only() -> None:
    with pytest.raises(ValueError, match="forward"):
        device().advance(-1)


# --- control -------------------------------------------------------------------------


def test_throttle_scales_consumption_by_the_permitted_rate() -> None:
    sim = device()
    assert sim.apply_control(control(1, "throttle", 250), GATEWAY.public_key()) == "applied"
    sim.advance(10)
    assert (sim.permille, sim.state) == (250, "throttle")
    assert sim.counters == {"api_calls": 50, "gpu_seconds": 2}  # 2.5 -> 2, the half carries


def test_block_stops_consumption_and_ok_resumes_it() -> None:
    sim = device()
    sim.apply_control(control(1, "block", 0), GATEWAY.public_key())
    sim.advance(100)
    assert sim.counters == {"api_calls": 0, "gpu_seconds": 0}
    sim.apply_control(control(2), GATEWAY.public_key())
    sim.advance(1)
    assert sim.counters == {"api_calls": 20, "gpu_seconds": 1}


@pytest.mark.parametrize(
    ("payload", "outcome"),
    [
        (control(5, "block", 0, key=Ed25519PrivateKey.generate()), ControlOutcome.REJECTED),
        (control(5, "block", 0, device_id="dev-2"), ControlOutcome.OTHER_DEVICE),
        (control(3, "block", 0), ControlOutcome.STALE),
        (control(2, "block", 0), ControlOutcome.STALE),
        (b"\x00junk", ControlOutcome.REJECTED),
        (b"", ControlOutcome.REJECTED),
    ],
    ids=["forged", "other-device", "same-seq", "older-seq", "junk", "empty"],
)
def test_control_messages_that_must_be_ignored(payload: bytes, outcome: ControlOutcome) -> None:
    """Forged, misaddressed and stale control messages change nothing."""
    sim = device()
    sim.apply_control(control(3, "throttle", 500), GATEWAY.public_key())
    assert sim.apply_control(payload, GATEWAY.public_key()) == outcome
    assert (sim.state, sim.permille, sim.control and sim.control.seq) == ("throttle", 500, 3)


# --- reports, reset ----------------------------------------------------------------------


def test_report_round_trips_through_the_gateways_decoder() -> None:
    sim = device()
    sim.advance(1.5)
    first = decode_usage(sim.report(1_000), DEVICE_KEY.public_key())
    sim.advance(1)
    second = decode_usage(sim.report(2_000), DEVICE_KEY.public_key())
    assert first == UsageReport("dev-1", 0, 1, 1_000, {"api_calls": 30, "gpu_seconds": 1})
    assert second == UsageReport("dev-1", 0, 2, 2_000, {"api_calls": 50, "gpu_seconds": 2})


def test_report_does_not_verify_under_another_key() -> None:
    decoded = decode_usage(device().report(1), Ed25519PrivateKey.generate().public_key())
    assert isinstance(decoded, Rejection)
    assert decoded.reason == "bad_signature"


def test_factory_reset_starts_a_new_boot_epoch_and_keeps_control() -> None:
    sim = device()
    sim.apply_control(control(7, "throttle", 500), GATEWAY.public_key())
    sim.advance(3.3)
    sim.report(1)
    sim.factory_reset()
    assert (sim.boot, sim.number, sim.counters) == (1, 0, {"api_calls": 0, "gpu_seconds": 0})
    assert sim.permille == 500
    sim.advance(1)
    report = decode_usage(sim.report(2), DEVICE_KEY.public_key())
    assert isinstance(report, UsageReport)
    assert (report.boot, report.number, dict(report.counters)) == (1, 1, sim.counters)


def test_step_crossed_until_the_next_report() -> None:
    sim = device({"api_calls": 20}, step=50)
    sim.advance(2)
    assert not sim.step_crossed()  # 40 < 50
    sim.advance(1)
    assert sim.step_crossed()  # 60
    sim.report(1)
    assert not sim.step_crossed()
    assert not device(step=0).step_crossed()


# --- serialisation, construction ---------------------------------------------------------


def test_serialisation_round_trip_continues_exactly() -> None:
    """A restored device has the same state, remainders included, and counts on identically."""
    sim = device({"api_calls": "7/3", "gpu_seconds": 1})
    sim.apply_control(control(4, "throttle", 333), GATEWAY.public_key())
    sim.advance(1.7)
    sim.report(5)
    sim.factory_reset()
    sim.advance(0.9)
    restored = SimDevice.from_dict(json.loads(json.dumps(sim.to_dict())))
    assert restored.to_dict() == sim.to_dict()
    for each in (sim, restored):
        each.advance(2.2)
    assert restored.report(9) == sim.report(9)


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: d.pop("key"),
        lambda d: d.update(key="00"),
        lambda d: d.update(counters={"api_calls": -1, "gpu_seconds": 0}),
        lambda d: d.update(counters={"api_calls": 1}),
        lambda d: d.update(remainders={"api_calls": "x", "gpu_seconds": "0"}),
        lambda d: d.update(control={"device": "dev-1"}),
        lambda d: d.update(boot="1"),
    ],
)
def test_from_dict_refuses_damaged_state(damage: Callable[[dict[str, Any]], object]) -> None:
    data = device().to_dict()
    damage(data)
    with pytest.raises(ValueError, match="not a saved device"):
        SimDevice.from_dict(data)


@pytest.mark.parametrize(
    ("device_id", "rates", "step"),
    [("bad id", {"a": 1}, 0), ("ok", {"Bad": 1}, 0), ("ok", {"a": -1}, 0), ("ok", {"a": 1}, -1)],
)
def test_construction_refuses_bad_values(device_id: str, rates: dict[str, int], step: int) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 -- several distinct messages
        SimDevice(device_id, DEVICE_KEY, rates, step=step)


def test_exact_refuses_non_finite_floats() -> None:
    assert exact(0.1) == Fraction(1, 10)
    with pytest.raises(ValueError, match="finite"):
        exact(math.inf)


def test_make_devices_is_deterministic_and_varied() -> None:
    first, again, other = make_devices(8, seed=1), make_devices(8, seed=1), make_devices(8, seed=2)
    assert [d.to_dict() for d in first] == [d.to_dict() for d in again]
    assert first[0].to_dict()["key"] != other[0].to_dict()["key"]
    assert [d.device_id for d in first[:2]] == ["sim-0000", "sim-0001"]
    assert len({d.rates["api_calls"] for d in first}) > 1
    assert all(Fraction(10) <= d.rates["api_calls"] <= Fraction(40) for d in first)
