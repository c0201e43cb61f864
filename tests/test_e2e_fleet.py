"""A simulated fleet with fault injection, through a real broker and a real gateway."""

from __future__ import annotations

import subprocess
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any

from device_sim.device import make_devices
from device_sim.faults import FaultPlan
from device_sim.fleet import Fleet
from gateway.mqtt import BrokerUrl
from gateway.pricing import charged
from tests.helpers import PRICES, running_gateway

RATES = {"api_calls": 40, "gpu_seconds": 2}
START_MS = 1_795_000_000_000


def expected_tokens(boots: dict[int, dict[str, int]]) -> int:
    prices = {meter: Fraction(text) for meter, text in PRICES.items()}
    return sum(
        charged(count, prices[m]) for counters in boots.values() for m, count in counters.items()
    )


async def test_a_faulty_fleet_ends_with_every_balance_exact(broker: Any, tmp_path: Path) -> None:
    """Duplicates, replays, reorders, forgeries, impersonation, junk and factory resets:
    every device is charged exactly charged(final counters) of each boot epoch."""
    async with running_gateway(broker.url, tmp_path) as gw:
        devices = make_devices(12, seed=3, rates=RATES, id_prefix="fleet")
        for device in devices:
            await gw.add_device(device.device_id, device.key, 1_000_000)
        rates = {"duplicate": 0.2, "replay": 0.15, "reorder": 0.15}
        faults = FaultPlan(**rates, forge=0.05, impersonate=0.05, malformed=0.05, seed=11)
        prefix = gw.topics.prefix
        fleet = Fleet.create(
            devices, BrokerUrl.parse(broker.url), gw.key, prefix, faults, clock=lambda: START_MS
        )
        await fleet.start()
        try:
            for step in range(40):
                fleet.tick(1.5, START_MS + step * 1500)
                if step == 20:
                    devices[0].factory_reset()  # a new boot epoch, counters from zero
                    devices[5].factory_reset()
            await fleet.flush(30)
            expected = {d: expected_tokens(boots) for d, boots in fleet.expected_counters().items()}
            await gw.wait_committed(
                lambda: all(gw.service.registry.devices[d].used == t for d, t in expected.items()),
                60,
            )
        finally:
            await fleet.stop()
        assert sum(faults.injected.values()) > 50
        for device_id, tokens in expected.items():
            granted, debited = await gw.service.ledger.totals(device_id)
            assert (granted, debited) == (1_000_000, tokens)
        metrics = (await gw.api.get("/metrics")).text
        assert 'tokenwell_rejected_reports_total{reason="bad_signature"}' in metrics


async def test_a_blocked_device_stops_and_a_refill_resumes_it(broker: Any, tmp_path: Path) -> None:
    async with running_gateway(broker.url, tmp_path) as gw:
        (device,) = make_devices(1, seed=5, rates={"api_calls": 1000}, id_prefix="stop")
        await gw.add_device(device.device_id, device.key, 50)  # 5,000 api_calls
        fleet = Fleet.create([device], BrokerUrl.parse(broker.url), gw.key, gw.topics.prefix)
        await fleet.start()
        try:
            fleet.tick(10.0, START_MS)  # 10,000 api_calls = 100 tokens: past the allocation
            blocked = await fleet.wait_for_control(device.device_id, lambda c: c.state == "block")
            assert blocked.why == "exhausted"
            assert blocked.balance == gw.service.state(device.device_id)["balance"] < 0
            frozen = dict(device.counters)
            fleet.tick(5.0, START_MS + 200_000)
            assert device.counters == frozen  # a blocked device consumes nothing
            reply = await gw.api.post(
                f"/v1/devices/{device.device_id}/refill", json={"tokens": 1000}
            )
            assert reply.status_code == 200
            control = await fleet.wait_for_control(device.device_id, lambda c: c.state == "ok")
            assert control.why == "refill"
            fleet.tick(1.0, START_MS + 201_000)
            assert device.counters["api_calls"] > frozen["api_calls"]
        finally:
            await fleet.stop()


def test_the_demo_runs_end_to_end(tmp_path: Path) -> None:
    """``tokenwell demo`` starts a broker, a gateway and a fleet, shows the table, stops cleanly."""
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "demo", "--duration", "4", "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=90, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "admin token:" in result.stdout
    assert "demo-0000" in result.stdout
    assert "Traceback" not in result.stderr
    assert (tmp_path / "ledger.sqlite3").exists()
