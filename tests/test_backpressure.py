"""Overload: a backlog far larger than the gateway's window is drained without dropping a
report and without holding more than the broker's in-flight window in memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gateway.app import MAX_UNACKNOWLEDGED
from tests.helpers import Listener, RawDevice, running_gateway

# The broker's in-flight window (max_inflight_messages 5000) should bound what the gateway
# holds, but Mosquitto 2.0.11 was seen sending 19,000 unacknowledged reports of a 30,000
# backlog; the gateway's own limit (gateway.app.MAX_UNACKNOWLEDGED) stops it reading then.
BOUND = MAX_UNACKNOWLEDGED


async def test_a_backlog_is_drained_with_memory_bounded_by_the_broker_window(
    broker: Any, tmp_path: Path
) -> None:
    devices = [RawDevice(f"load-{i}") for i in range(50)]
    prefix, client_id = "load/v1", "load-gateway"
    async with running_gateway(broker.url, tmp_path, prefix=prefix, client_id=client_id) as gw:
        for device in devices:
            await gw.add_device(device.id, device.key, 10**9)
        topics = gw.topics
    async with Listener.connect(broker.url) as publisher:  # 15,000 reports while it is down
        for round_ in range(1, 301):
            for device in devices:
                publisher.publish(
                    topics.usage(device.id), device.report({"api_calls": round_ * 100})
                )
        assert await publisher.client.flush(60)
    async with running_gateway(broker.url, tmp_path, prefix=prefix, client_id=client_id) as gw:
        registry = gw.service.registry
        await gw.wait_committed(
            lambda: all(registry.devices[d.id].used == 300 for d in devices), timeout=60
        )
        assert 0 < gw.service.backlog_high_water <= BOUND
