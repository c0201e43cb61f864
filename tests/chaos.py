"""A seeded fault-injection harness: real Mosquitto, real SQLite, the real gateway process.

A simulated fleet (with duplicates, replays, reorders and junk) reports while the harness,
step by step and driven by one seed, kills the gateway with SIGKILL, restarts or kills the
broker, restarts the simulator from its state file, and cuts a group of devices off for a
while. At the end every device sends a fresh report (as on reconnect) and the harness
checks, from the outside only:

* every device's charge equals ``charged(final counters)`` of every boot epoch it used;
* the control message each device applied is the gateway's latest for it;
* the ledger's invariants: allocation == sum of grants, used == sum of debits, no ``H``
  above a reported counter.

The same seed replays the same schedule, so a failure reproduces.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import httpx

from broker import RunningBroker
from device_sim.device import SimDevice, make_devices
from device_sim.faults import FaultPlan
from device_sim.fleet import Fleet
from device_sim.store import load_fleet
from gateway.mqtt import BrokerUrl
from gateway.pricing import charged
from gateway.sqlite_ledger import SqliteLedger
from gateway.topics import Topics
from gateway.wire import public_key_from_hex, public_key_hex
from tests.helpers import TOKEN, GatewayProcess, Listener, assert_conserved

PREFIX = "chaos/v1"
PRICES = {"api_calls": Fraction(1, 100), "gpu_seconds": Fraction(1, 3)}
CONFIG = f"""
topic_prefix = "{PREFIX}"
client_id = "chaos-gateway"
[meters]
api_calls = "1/100"
gpu_seconds = "1/3"
"""
START_MS = 1_795_000_000_000
ACTIONS = ("kill_gateway", "restart_broker", "kill_broker", "restart_sim", "cut_off", "reset")


@dataclass
class Schedule:
    """How often each disruption happens, per step."""

    steps: int = 40
    devices: int = 10
    kill_gateway: float = 0.10
    restart_broker: float = 0.04
    kill_broker: float = 0.03
    restart_sim: float = 0.05
    cut_off: float = 0.08
    reset: float = 0.03  # a device's factory reset: a new boot epoch


@dataclass
class Outcome:
    """What a run did and checked, for the test and the soak report."""

    seed: int
    steps: int
    actions: Counter[str] = field(default_factory=Counter)
    injected: Counter[str] = field(default_factory=Counter)
    reports: int = 0
    devices_checked: int = 0


class ChaosRun:
    """One seeded run; ``await run()`` returns the outcome or raises AssertionError."""

    def __init__(self, broker: RunningBroker, folder: Path, seed: int, schedule: Schedule) -> None:
        self.broker, self.folder, self.seed, self.schedule = broker, folder, seed, schedule
        self.rng = random.Random(seed)
        self.gateway = GatewayProcess.prepare(broker.url, folder, CONFIG)
        self.store = folder / "fleet.json"
        self.topics = Topics(PREFIX)
        self.outcome = Outcome(seed, schedule.steps)
        self.expected: dict[str, dict[int, dict[str, int]]] = {}
        self.gateway_key: Any = None

    async def run(self) -> Outcome:
        self.gateway.start()
        devices = make_devices(self.schedule.devices, seed=self.seed, id_prefix="chaos")
        await self._provision(devices)
        fleet = await self._fleet(devices)
        cut: set[str] = set()
        for step in range(self.schedule.steps):
            now = START_MS + step * 1000
            fleet.advance(1.0)  # cut-off devices keep consuming, silently
            self.outcome.reports += fleet.publish_reports(now, silent=cut)
            fleet = await self._disrupt(fleet, cut)
        return await self._finish(fleet)

    async def _provision(self, devices: list[SimDevice]) -> None:
        async with httpx.AsyncClient(
            base_url=self.gateway.api_url, headers={"Authorization": f"Bearer {TOKEN}"}
        ) as api:
            self.gateway_key = public_key_from_hex(
                (await api.get("/v1/gateway")).json()["public_key"]
            )
            for index, device in enumerate(devices):
                tokens = (5, 20, 60, 10**6)[index % 4]  # some run out: throttle, block
                body = {
                    "id": device.device_id,
                    "public_key": public_key_hex(device.public_key),
                    "tokens": tokens,
                }
                assert (await api.post("/v1/devices", json=body)).status_code == 201

    async def _fleet(self, devices: list[SimDevice]) -> Fleet:
        faults = FaultPlan(duplicate=0.1, replay=0.1, reorder=0.1, forge=0.03, malformed=0.03,
                           impersonate=0.03, seed=self.rng.randrange(2**32))  # fmt: skip
        fleet = Fleet.create(devices, BrokerUrl.parse(self.broker.url), self.gateway_key, PREFIX,
                             faults, self.store, clock=lambda: START_MS)  # fmt: skip
        await fleet.start(timeout=30)
        self._faults = faults
        return fleet

    def _remember(self, fleet: Fleet) -> None:
        """Fold a fleet's record of what it reported into the run's (a restarted
        simulator is a new Fleet object; counters only grow within a boot epoch)."""
        for device, boots in fleet.expected_counters().items():
            for boot, counters in boots.items():
                self.expected.setdefault(device, {})[boot] = counters

    async def _disrupt(self, fleet: Fleet, cut: set[str]) -> Fleet:
        schedule = self.schedule
        for action in ACTIONS:
            if self.rng.random() >= getattr(schedule, action):
                continue
            self.outcome.actions[action] += 1
            if action == "kill_gateway":
                self.gateway.kill()  # SIGKILL: mid-batch, mid-commit, wherever it is
                self.gateway.start()
            elif action == "restart_broker":
                self.broker.restart()
            elif action == "kill_broker":
                self.broker.kill()  # loses what it had not saved; devices make it good
                self.broker.start()
            elif action == "restart_sim":
                fleet = await self._restart_sim(fleet)
            elif action == "cut_off":
                ids = sorted(fleet.devices)
                toggled = set(self.rng.sample(ids, k=max(1, len(ids) // 4)))
                cut.symmetric_difference_update(toggled)
            elif action == "reset":
                device = fleet.devices[self.rng.choice(sorted(fleet.devices))]
                device.factory_reset()
        return fleet

    async def _restart_sim(self, fleet: Fleet) -> Fleet:
        self._count_faults(fleet)
        await fleet.stop()
        return await self._fleet(load_fleet(self.store))

    def _count_faults(self, fleet: Fleet) -> None:
        self._remember(fleet)
        for kind, count in self._faults.injected.items():
            self.outcome.injected[str(kind)] += count

    async def _finish(self, fleet: Fleet) -> Outcome:
        if not self.broker.running:
            self.broker.start()
        now = START_MS + (self.schedule.steps + 1) * 1000
        fleet.resend_tails()  # as after a reconnect: earlier epochs' last reports,
        self.outcome.reports += fleet.publish_reports(now)  # then everyone's current one
        await fleet.flush(60)
        self._count_faults(fleet)
        try:
            await self._await_exact_charges()
            await self._await_latest_controls(fleet)
        finally:
            await fleet.stop()
        assert self.gateway.terminate() == 0, "SIGTERM must stop the gateway cleanly"
        await self._check_ledger()
        return self.outcome

    def expected_used(self, device: str) -> int:
        boots = self.expected.get(device, {})
        return sum(
            charged(count, PRICES[m])
            for counters in boots.values()
            for m, count in counters.items()
        )

    async def _await_exact_charges(self) -> None:
        async with Listener.connect(self.broker.url, self.topics.all_fleet_devices) as listen:
            for device in sorted(self.expected):
                want = self.expected_used(device)
                try:
                    await listen.wait_for(
                        lambda m, d=device, w=want: (
                            m.topic == self.topics.fleet_device(d)
                            and json.loads(m.payload)["used"] == w
                        ),
                        timeout=30,
                    )
                except TimeoutError:
                    raise AssertionError(await self._explain(device, want)) from None
                self.outcome.devices_checked += 1

    async def _explain(self, device: str, want: int) -> str:
        """Why a device's charge differs: expected counters against the ledger's ``H``."""
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with httpx.AsyncClient(base_url=self.gateway.api_url, headers=headers) as api:
            used = (await api.get(f"/v1/devices/{device}")).json()["used"]
        ledger = SqliteLedger(self.folder / "ledger.sqlite3")
        await ledger.open()
        try:
            highs = [h for h in (await ledger.load()).highs if h.device == device]
        finally:
            await ledger.close()
        return (
            f"{device}: used {used}, want {want}; reported {self.expected[device]};"
            f" charged up to {[(h.boot, h.meter, h.high) for h in highs]};"
            f" actions so far {dict(self.outcome.actions)}"
        )

    async def _await_latest_controls(self, fleet: Fleet) -> None:
        async with httpx.AsyncClient(
            base_url=self.gateway.api_url, headers={"Authorization": f"Bearer {TOKEN}"}
        ) as api:
            for device in fleet.devices.values():
                latest = (await api.get(f"/v1/devices/{device.device_id}")).json()["control_seq"]
                await fleet.wait_for_control(
                    device.device_id, lambda c, n=latest: c.seq == n, timeout=30
                )

    async def _check_ledger(self) -> None:
        ledger = SqliteLedger(self.folder / "ledger.sqlite3")
        await ledger.open()
        try:
            snapshot = await assert_conserved(ledger)
            for device in snapshot.devices:
                assert device.used == self.expected_used(device.id), device.id
            for mark in snapshot.highs:
                assert mark.high <= self.expected[mark.device][mark.boot][mark.meter]
        finally:
            await ledger.close()


async def chaos(broker: RunningBroker, folder: Path, seed: int, schedule: Schedule) -> Outcome:
    """Run one seeded chaos run; raises AssertionError naming the seed on failure."""
    try:
        return await ChaosRun(broker, folder, seed, schedule).run()
    except BaseException as exc:
        raise AssertionError(f"chaos run failed; reproduce with seed={seed}: {exc!r}") from exc
