"""A device flooding its usage topic is reported, charged exactly, and does not stop others."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from gateway.flood import FloodMonitor
from tests.helpers import Listener, RawDevice, running_gateway


def test_a_device_is_named_once_when_it_passes_the_limit_and_again_a_minute_later() -> None:
    monitor = FloodMonitor(limit=3)
    assert monitor.observe(["a", "a", "b", "a"], now_ms=1_000) == []
    assert monitor.observe(["a", "a", "b"], now_ms=1_500) == ["a"]  # 4th and 5th in the window
    assert monitor.observe(["a"] * 10, now_ms=2_000) == []  # announced already
    assert monitor.observe(["b"] * 4, now_ms=2_100) == ["b"]
    assert monitor.observe(["a"] * 4, now_ms=60_000) == ["a"]  # a new minute


async def test_a_flooding_device_is_reported_and_everyone_is_charged_exactly(
    broker: Any, tmp_path: Path
) -> None:
    async with running_gateway(broker.url, tmp_path) as gw:
        flooder, others = RawDevice("flood-1"), [RawDevice(f"calm-{i}") for i in range(5)]
        for device in [flooder, *others]:
            await gw.add_device(device.id, device.key, 10**6)
        async with Listener.connect(broker.url, gw.topics.event("flood")) as listen:
            for n in range(1, 2001):
                listen.publish(gw.topics.usage(flooder.id), flooder.report({"api_calls": n * 10}))
                if n % 400 == 0:
                    for device in others:
                        listen.publish(gw.topics.usage(device.id), device.report({"api_calls": n}))
            event = await listen.wait_for(lambda m: json.loads(m.payload)["device"] == "flood-1")
            assert json.loads(event.payload)["limit_per_second"] == 20
            registry = gw.service.registry
            await gw.wait_committed(
                lambda: (
                    registry.devices["flood-1"].used == 200
                    and all(registry.devices[d.id].used == 20 for d in others)
                ),
                timeout=30,
            )
        assert all(json.loads(m.payload)["device"] == "flood-1" for m in listen.messages)
        metrics = (await gw.api.get("/metrics")).text
        floods = re.search(r"^tokenwell_floods_total (\S+)$", metrics, re.MULTILINE)
        assert floods is not None
        assert float(floods.group(1)) >= 1  # once, or twice if the run crossed a minute
