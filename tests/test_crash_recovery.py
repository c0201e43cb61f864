"""A gateway killed with SIGKILL mid-stream and restarted: nothing lost, nothing charged twice."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import httpx

from gateway.pricing import charged, parse_price
from gateway.sqlite_ledger import SqliteLedger
from gateway.topics import Topics
from tests.helpers import TOKEN, GatewayProcess, Listener, RawDevice, assert_conserved

CONFIG = """
topic_prefix = "crash/v1"
client_id = "crash-gateway"
[meters]
api_calls = "0.01"
gpu_seconds = "1/3"
"""
PRICES = {"api_calls": parse_price("0.01"), "gpu_seconds": parse_price("1/3")}
SHARED_TOKENS = 1000


def expected_used(final: dict[str, int]) -> int:
    return sum(charged(count, PRICES[meter]) for meter, count in final.items())


def stream(
    devices: list[RawDevice], reports: int, rng: random.Random
) -> tuple[list[tuple[str, bytes]], dict[str, dict[str, int]]]:
    """Interleaved reports of every device, with duplicates and replays mixed in."""
    out: list[tuple[str, bytes]] = []
    final: dict[str, dict[str, int]] = {}
    sent: list[tuple[str, bytes]] = []
    counters = {d.id: {"api_calls": 0, "gpu_seconds": 0} for d in devices}
    for _ in range(reports):
        device = rng.choice(devices)
        counts = counters[device.id]
        counts["api_calls"] += rng.randint(1, 500)
        counts["gpu_seconds"] += rng.randint(0, 3)
        item = (device.id, device.report(dict(counts)))
        out.append(item)
        sent.append(item)
        if rng.random() < 0.2:
            out.append(rng.choice(sent))  # a duplicate or a replay of an earlier report
        final[device.id] = dict(counts)
    return out, final


async def test_sigkill_mid_stream_loses_nothing_and_charges_nothing_twice(
    broker: Any, tmp_path: Path
) -> None:
    rng = random.Random(20261128)
    topics = Topics("crash/v1")
    devices = [RawDevice(f"crash-{i}") for i in range(5)]
    gateway = GatewayProcess.prepare(broker.url, tmp_path, CONFIG)
    gateway.start()
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=gateway.api_url, headers=headers) as api:
        # Two devices share an account's pool with alerts: edge-triggered state must
        # survive the kills too (each threshold fires once, whatever is redelivered).
        pool = {"thresholds": ["50%", "90%"]}
        assert (await api.put("/v1/accounts/crashco/pool", json=pool)).status_code == 200
        grant = await api.post("/v1/accounts/crashco/grants", json={"tokens": SHARED_TOKENS})
        assert grant.status_code == 200
        for number, device in enumerate(devices):
            key = device.key.public_key().public_bytes_raw().hex()
            body: dict[str, Any] = {"id": device.id, "public_key": key, "tokens": 10**9}
            if number < 2:
                body.update(tokens=0, account="crashco", pool="shared")
            assert (await api.post("/v1/devices", json=body)).status_code == 201

    messages, final = stream(devices, 1500, rng)
    kills = 3
    cut_points = sorted(rng.sample(range(100, len(messages) - 100), kills))
    async with Listener.connect(broker.url, topics.all_fleet_devices) as listen:
        start = 0
        for cut in [*cut_points, len(messages)]:
            for device_id, payload in messages[start:cut]:
                listen.publish(topics.usage(device_id), payload)
            start = cut
            if cut != len(messages):
                gateway.kill()  # mid-stream: reports are still arriving and being committed
                gateway.start()
        assert await listen.client.flush(30)  # every report is with the broker
        for device in devices:
            want = expected_used(final[device.id])
            await listen.wait_for(
                lambda m, d=device.id, w=want: (
                    m.topic == topics.fleet_device(d) and json.loads(m.payload)["used"] == w
                ),
                timeout=60,
            )
    assert gateway.terminate() == 0

    ledger = SqliteLedger(tmp_path / "ledger.sqlite3")
    await ledger.open()
    try:
        snapshot = await assert_conserved(ledger)
        for device in snapshot.devices:
            assert device.used == expected_used(final[device.id])
            if device.pool == device.id:
                assert (await ledger.totals(device.id))[1] == device.used
        shared = next(p for p in snapshot.pools if p.key == "@crashco")
        want = sum(expected_used(final[d.id]) for d in devices[:2])
        assert (await ledger.totals("@crashco"))[1] == shared.used == want
        assert want >= SHARED_TOKENS * 9 // 10  # both alerts were due, once each
        assert [str(share) for share in shared.fired] == ["1/2", "9/10"]
        for mark in snapshot.highs:
            assert mark.high == final[mark.device][mark.meter]
    finally:
        await ledger.close()
