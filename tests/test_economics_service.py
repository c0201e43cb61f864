"""Time in the token economics, through the service with a fake clock: period resets and
grant expiries are applied when they are due (no waiting), each device on a pool is sent
``period_reset``, and every step leaves the ledger conserved."""

from __future__ import annotations

import datetime as dt

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.config import DEFAULT_LADDER
from gateway.economics import PeriodRule, PoolSettings, shared_pool_key
from gateway.ingest import Pricing
from gateway.ledger import MemoryLedger
from gateway.mqtt import Incoming
from gateway.pricing import parse_price
from gateway.service import MeteringService
from gateway.topics import Topics
from gateway.wire import ControlMessage, decode_control
from tests.helpers import RawDevice, assert_conserved

DAY = 86_400_000
START = int(dt.datetime(2026, 11, 1, tzinfo=dt.UTC).timestamp() * 1000)


class FakeBroker:
    """Records what the service publishes; confirms nothing (no acks needed here)."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int:
        self.published.append((topic, payload))
        return len(self.published)

    def ack(self, message: Incoming) -> None:
        return None

    def add_key(self, device: str, public_key: bytes) -> None:
        return None

    @property
    def unconfirmed(self) -> int:
        return 0


class Clock:
    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def make_service() -> tuple[MeteringService, FakeBroker, Clock, Ed25519PrivateKey]:
    key = Ed25519PrivateKey.generate()
    clock = Clock(START + 3_600_000)
    pricing = Pricing({"api_calls": parse_price("1")}, DEFAULT_LADDER)
    service = MeteringService(MemoryLedger(), pricing, Topics("t"), key, clock)
    broker = FakeBroker()
    service.attach(broker, broker)
    return service, broker, clock, key


def controls(broker: FakeBroker, key: Ed25519PrivateKey, device: str) -> list[ControlMessage]:
    found = []
    for topic, payload in broker.published:
        if topic == f"t/devices/{device}/control":
            message = decode_control(payload, key.public_key())
            assert isinstance(message, ControlMessage)
            found.append(message)
    return found


async def charge(service: MeteringService, device: RawDevice, units: int) -> None:
    from gateway.ingest import charge_batch, verify

    payload = device.report({"api_calls": units})
    report = verify(device.id, payload, service.registry)
    result = charge_batch([report], service.registry, service.pricing, service._clock())
    await service.ledger.commit(result.write)
    service.registry.apply(result.devices, result.pools.values())


async def test_a_monthly_period_resets_every_device_on_the_pool_with_rollover() -> None:
    service, broker, clock, key = make_service()
    rule = PeriodRule("month", START, 100, rollover_cap=30)
    pool = shared_pool_key("acme")
    await service.configure_pool(pool, PoolSettings(period=rule), account="acme")
    await service.grant(pool, 100)
    devices = [RawDevice(f"m-{i}") for i in range(2)]
    for device in devices:
        await service.provision(device.id, device.key.public_key().public_bytes_raw(), 0,
                                "acme", shared=True)  # fmt: skip
    await charge(service, devices[0], 60)  # 40 left of 100: 30 roll over
    await service.pass_time()
    assert service.registry.pools[pool].used == 60  # nothing due yet

    clock.now = int(dt.datetime(2026, 12, 1, 0, 0, 1, tzinfo=dt.UTC).timestamp() * 1000)
    await service.pass_time()
    reset = service.registry.pools[pool]
    assert (reset.allocation, reset.used, reset.balance) == (130, 0, 130)
    assert reset.period_start_ms == int(dt.datetime(2026, 12, 1, tzinfo=dt.UTC).timestamp() * 1000)
    assert [(g.kind, g.remaining) for g in reset.grants] == [("rollover", 30), ("period", 100)]
    for device in devices:
        last = controls(broker, key, device.id)[-1]
        assert (last.why, last.balance, last.state) == ("period_reset", 130, "ok")
        assert service.state(device.id)["used"] == 0  # the device's count is per period
    events = [payload for topic, payload in broker.published if topic.endswith("/period_reset")]
    assert len(events) == 1
    await service.pass_time()  # nothing more is due: no second reset
    assert [p for t, p in broker.published if t.endswith("/period_reset")] == events
    await assert_conserved(service.ledger)


async def test_an_expired_grant_stops_counting_and_can_block_a_device() -> None:
    service, broker, clock, key = make_service()
    device = RawDevice("exp-1")
    await service.provision(device.id, device.key.public_key().public_bytes_raw(), 0, None)
    await service.grant(device.id, 50, expires_ms=clock.now + DAY)
    assert controls(broker, key, device.id)[-1].state == "ok"
    clock.now += DAY
    await service.pass_time()
    pool = service.registry.pools[device.id]
    assert (pool.balance, pool.forfeited, pool.grants) == (0, 50, ())
    blocked = controls(broker, key, device.id)[-1]
    assert (blocked.state, blocked.why) == ("block", "exhausted")
    assert await service.ledger.totals(device.id) == (0, 0)  # 50 granted, 50 forfeited


async def test_grants_burn_by_priority_then_earliest_expiry_then_oldest() -> None:
    service, _, clock, _ = make_service()
    device = RawDevice("burn-1")
    await service.provision(device.id, device.key.public_key().public_bytes_raw(), 10, None)
    await service.grant(device.id, 10, expires_ms=clock.now + 2 * DAY)
    await service.grant(device.id, 10, expires_ms=clock.now + DAY)
    await service.grant(device.id, 10, priority=1)
    await charge(service, device, 25)
    left = {(g.kind, g.expires_ms is None, g.priority): g.remaining
            for g in service.registry.pools[device.id].grants}  # fmt: skip
    # priority 0 first: the one expiring first, then the later, then the oldest without
    # expiry (the initial grant, 5 left); the priority-1 grant is untouched.
    assert left == {("initial", True, 0): 5, ("grant", True, 1): 10}


async def test_after_a_long_outage_every_missed_period_is_applied_in_order() -> None:
    service, broker, clock, _ = make_service()
    device = RawDevice("daily-1")
    rule = PeriodRule("day", START, 10, rollover_cap=0)
    await service.provision(device.id, device.key.public_key().public_bytes_raw(), 10, None,
                            settings=PoolSettings(period=rule))  # fmt: skip
    clock.now += 5 * DAY
    await service.pass_time()
    pool = service.registry.pools[device.id]
    assert (pool.allocation, pool.balance) == (10, 10)
    assert pool.period_start_ms == START + 5 * DAY
    resets = [t for t, _ in broker.published if t.endswith("/period_reset")]
    assert len(resets) == 5
    await assert_conserved(service.ledger)
