"""The fleet end to end through a real broker: reports arrive signed and complete, control
messages are obeyed only when genuine, a reconnect brings a fresh report from everyone, and
a real gateway charges exactly what the fleet reported, whatever faults are injected.

Uses the ``broker`` fixture of tests/conftest.py; skipped where there is none. Waiting is on
the messages themselves, with a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from device_sim.device import SimDevice, make_devices
from device_sim.faults import FaultKind, FaultPlan
from device_sim.fleet import Fleet, wall_clock_ms
from gateway.mqtt import BrokerUrl, Incoming, MqttClient
from gateway.pricing import charged, parse_price
from gateway.topics import Topics
from gateway.wire import ControlMessage, ControlState, UsageReport, decode_usage, sign_control
from tests.helpers import PRICES, running_gateway

GATEWAY = Ed25519PrivateKey.from_private_bytes(bytes(32))
T0 = 1_700_000_000_000
Latest = dict[str, UsageReport]


@pytest.fixture
def topics() -> Topics:
    return Topics(f"test/{uuid.uuid4().hex[:12]}")


@contextlib.asynccontextmanager
async def mqtt(
    url: str, *subscriptions: str, persistent: bool = False
) -> AsyncIterator[tuple[MqttClient, asyncio.Queue[Incoming]]]:
    """A plain client (subscribed to ``subscriptions``) and its inbox."""
    inbox: asyncio.Queue[Incoming] = asyncio.Queue()
    client_id = f"test-sim-{uuid.uuid4().hex[:8]}"
    client = MqttClient(BrokerUrl.parse(url), client_id, inbox=inbox, persistent=persistent)
    for topic in subscriptions:
        client.subscribe(topic, 1)
    await client.connect()
    try:
        yield client, inbox
    finally:
        await client.disconnect()


@contextlib.asynccontextmanager
async def running(fleet: Fleet) -> AsyncIterator[Fleet]:
    await fleet.start()
    try:
        yield fleet
    finally:
        await fleet.stop()


async def collect(
    inbox: asyncio.Queue[Incoming],
    devices: list[SimDevice],
    done: Callable[[Latest], bool],
    timeout: float = 15.0,
) -> Latest:
    """Decode usage reports until ``done(latest report per device)``; asserts that every
    message on a device's topic either is that device's genuine report or is refused."""
    keys = {device.device_id: device.public_key for device in devices}
    latest: Latest = {}
    async with asyncio.timeout(timeout):
        while not done(latest):
            message = await inbox.get()
            device = message.topic.split("/")[-2]
            report = decode_usage(message.payload, keys[device])
            if not isinstance(report, UsageReport) or report.device != device:
                continue  # an injected fault: refused, as it must be
            if device not in latest or report.number > latest[device].number:
                latest[device] = report
    return latest


def numbered(devices: list[SimDevice], number: int) -> Callable[[Latest], bool]:
    """Done once every device's report number ``number`` has arrived."""
    ids = {device.device_id for device in devices}
    return lambda latest: set(latest) == ids and all(r.number >= number for r in latest.values())


def as_expected(latest: Latest) -> dict[str, dict[int, dict[str, int]]]:
    return {device: {r.boot: dict(r.counters)} for device, r in latest.items()}


async def test_reports_arrive_signed_and_carry_the_expected_counters(
    broker: Any, topics: Topics
) -> None:
    """One report per device on connecting, one per tick; the last ones are the totals."""
    devices = make_devices(3, seed=21)
    fleet = Fleet.create(devices, BrokerUrl.parse(broker.url), GATEWAY.public_key(), topics.prefix)
    async with mqtt(broker.url, topics.all_usage) as (_, inbox), running(fleet):
        for second in (1, 2, 3):
            fleet.tick(1.0, T0 + second * 1000)
        await fleet.flush()
        latest = await collect(inbox, devices, numbered(devices, 4))
    assert as_expected(latest) == fleet.expected_counters()
    assert all(r.device_time_ms == T0 + 3000 for r in latest.values())
    assert fleet.summary().reports == 12


async def test_faults_add_junk_but_every_genuine_report_still_arrives(
    broker: Any, topics: Topics
) -> None:
    devices = make_devices(4, seed=22)
    plan = FaultPlan(seed=5, **{kind.value: 0.4 for kind in FaultKind})
    url = BrokerUrl.parse(broker.url)
    fleet = Fleet.create(devices, url, GATEWAY.public_key(), topics.prefix, plan)
    async with mqtt(broker.url, topics.all_usage) as (_, inbox), running(fleet):
        for second in range(1, 11):
            fleet.tick(0.5, T0 + second * 500)
        await fleet.flush()
        latest = await collect(inbox, devices, numbered(devices, 11))
    assert as_expected(latest) == fleet.expected_counters()
    summary = fleet.summary()
    assert summary.messages == summary.reports + sum(
        n for kind, n in summary.injected.items() if kind != FaultKind.REORDER
    )
    assert summary.messages > summary.reports


def control(
    device: str, seq: int, state: ControlState, rate: int, key: Ed25519PrivateKey = GATEWAY
) -> bytes:
    message = ControlMessage(device, seq, T0, state, rate, 10, "test")
    return sign_control(message, key)


async def test_only_genuine_new_control_messages_are_obeyed(broker: Any, topics: Topics) -> None:
    devices = make_devices(2, seed=23)
    first, last = (d.device_id for d in devices)
    key: Ed25519PublicKey = GATEWAY.public_key()
    fleet = Fleet.create(devices, BrokerUrl.parse(broker.url), key, topics.prefix)
    async with mqtt(broker.url) as (gateway, _), running(fleet):
        # the last device subscribed last: once it obeys, every subscription is in place
        gateway.publish(topics.control(last), control(last, 1, "ok", 1000), retain=True)
        await fleet.wait_for_control(last, lambda m: m.seq == 1)
        sends = [
            control(first, 9, "block", 0, key=Ed25519PrivateKey.generate()),  # forged
            control(last, 9, "block", 0),  # another device's
            control(first, 2, "throttle", 500),
            control(first, 1, "block", 0),  # stale
            control(first, 3, "throttle", 200),
        ]
        for payload in sends:
            gateway.publish(topics.control(first), payload, qos=1)
        applied = await fleet.wait_for_control(first, lambda m: m.seq == 3)
    assert (applied.state, applied.rate_permille) == ("throttle", 200)
    assert dict(fleet.summary().control) == {
        "applied": 3,
        "rejected": 1,
        "other_device": 1,
        "stale": 1,
    }
    assert fleet.summary().throttled == 1


async def test_a_reconnect_brings_a_fresh_report_from_every_device(
    broker: Any, topics: Topics
) -> None:
    """Contract §4: devices publish a fresh report each time they (re)connect."""
    devices = make_devices(3, seed=24)
    fleet = Fleet.create(devices, BrokerUrl.parse(broker.url), GATEWAY.public_key(), topics.prefix)
    subscriber = mqtt(broker.url, topics.all_usage, persistent=True)
    async with subscriber as (_, inbox), running(fleet):
        fleet.tick(2.0, T0)
        await fleet.flush()
        await collect(inbox, devices, numbered(devices, 2))
        await asyncio.to_thread(broker.restart)
        latest = await collect(inbox, devices, numbered(devices, 3), timeout=30.0)
    assert as_expected(latest) == fleet.expected_counters()


# --- with a real gateway -----------------------------------------------------------------


async def test_the_gateway_charges_exactly_what_the_fleet_reported(
    broker: Any, tmp_path: Path
) -> None:
    """Through duplicates, replays, reorders, forgeries, impersonations, junk and a factory
    reset, each device is charged exactly charged(last counters) per boot epoch and meter."""
    prices = {meter: parse_price(text) for meter, text in PRICES.items()}
    devices = make_devices(4, seed=25)
    plan = FaultPlan(seed=6, **{kind.value: 0.3 for kind in FaultKind})
    async with running_gateway(broker.url, tmp_path) as gw:
        for device in devices:
            await gw.add_device(device.device_id, device.key, 1_000_000)
        fleet = Fleet.create(devices, BrokerUrl.parse(broker.url), gw.key, gw.topics.prefix, plan)
        async with running(fleet):
            for second in range(13):
                if second == 10:
                    devices[0].factory_reset()
                fleet.tick(1.3, wall_clock_ms())
            await fleet.flush()
            await gw.wait_committed(lambda: gw.service.processed >= fleet.summary().messages)
        for device_id, epochs in fleet.expected_counters().items():
            expected = sum(
                charged(count, prices[meter])
                for counters in epochs.values()
                for meter, count in counters.items()
            )
            assert expected > 0
            assert (await gw.device(device_id))["used"] == expected, device_id
    assert len(fleet.expected_counters()[devices[0].device_id]) == 2
    assert all(fleet.summary().injected.values())


async def test_a_device_obeys_the_gateways_block(broker: Any, tmp_path: Path) -> None:
    """Out of tokens, the gateway blocks the device and it stops consuming altogether."""
    (device,) = make_devices(1, seed=26)
    async with running_gateway(broker.url, tmp_path) as gw:
        await gw.add_device(device.device_id, device.key, 20)
        fleet = Fleet.create([device], BrokerUrl.parse(broker.url), gw.key, gw.topics.prefix)
        async with running(fleet):
            await fleet.wait_for_control(device.device_id, lambda m: m.state == "ok")
            fleet.tick(600.0, wall_clock_ms())  # far more than 20 tokens' worth
            blocked = await fleet.wait_for_control(device.device_id, lambda m: m.state == "block")
            before = dict(device.counters)
            fleet.tick(600.0, wall_clock_ms())
    assert (blocked.rate_permille, device.counters) == (0, before)
    assert fleet.summary().blocked == 1


async def test_only_devices_past_a_step_report_early(broker: Any, topics: Topics) -> None:
    keys = [Ed25519PrivateKey.from_private_bytes(bytes([i]) * 32) for i in (1, 2)]
    fast = SimDevice("fast", keys[0], {"api_calls": 50}, step=100)
    slow = SimDevice("slow", keys[1], {"api_calls": 1}, step=100)
    url = BrokerUrl.parse(broker.url)
    async with running(Fleet.create([fast, slow], url, None, topics.prefix)) as fleet:
        fleet.advance(3)
        assert fleet.publish_reports(T0, only_stepped=True) == 1
        assert fleet.expected_counters() == {
            "fast": {0: {"api_calls": 150}},
            "slow": {0: {"api_calls": 0}},
        }
        assert fleet.publish_reports(T0, only_stepped=True) == 0
