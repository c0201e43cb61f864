"""``tokenwell watch``: the fleet table built from the operator topics."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from gateway.topics import Topics
from gateway.watch import FleetView, watch
from tests.helpers import RawDevice, running_gateway


def state(device: str, **fields: Any) -> bytes:
    base = {"device": device, "account": "acme", "state": "ok", "rate_permille": 1000,
            "balance": 90, "allocation": 100, "used": 10, "last_report_at": None}  # fmt: skip
    return json.dumps({**base, **fields}).encode()


def test_the_view_shows_the_latest_state_of_each_device_and_recent_events() -> None:
    topics = Topics("t/v1")
    view = FleetView(topics)
    view.apply(topics.fleet_device("b-1"), state("b-1"))
    view.apply(topics.fleet_device("a-1"), state("a-1"))
    view.apply(
        topics.fleet_device("a-1"), state("a-1", state="throttle", rate_permille=500, balance=15)
    )
    view.apply(
        topics.event("block"), b'{"type":"block","device":"b-1","at":"2026-11-28T10:00:00.000Z"}'
    )
    view.apply(topics.fleet_device("junk"), b"\xff not json")
    lines = view.render().splitlines()
    assert lines[0].split()[:3] == ["device", "account", "state"]
    assert lines[2].split()[:5] == ["a-1", "acme", "throttle", "50%", "15"]
    assert lines[3].split()[:3] == ["b-1", "acme", "ok"]
    assert "junk" not in view.devices
    assert any("block" in line and "b-1" in line for line in lines)


async def test_watch_renders_the_fleet_from_a_running_gateway(
    shared_broker: Any, tmp_path: Path
) -> None:
    async with running_gateway(shared_broker.url, tmp_path) as gw:
        device = RawDevice("watched-1")
        await gw.add_device(device.id, device.key, 77, account="acme")
        gw.service.flush_fleet_state()
        out = io.StringIO()
        await watch(shared_broker.url, gw.topics.prefix, refresh=0.3, duration=0.6, out=out)
    assert "watched-1" in out.getvalue()
    assert "77" in out.getvalue()
