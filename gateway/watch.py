"""``tokenwell watch``: a live table of the fleet, built only from the operator topics.

:class:`FleetView` is pure (messages in, text out); :func:`watch` wires it to MQTT.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections import deque
from dataclasses import dataclass, field
from typing import Any, TextIO

from gateway.mqtt import BrokerUrl, Incoming, MqttClient
from gateway.topics import Topics

COLUMNS = ("device", "account", "state", "rate", "balance", "allocation", "used", "last report")


@dataclass
class FleetView:
    """The fleet as the operator topics describe it."""

    topics: Topics
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: deque[str] = field(default_factory=lambda: deque(maxlen=8))

    def apply(self, topic: str, payload: bytes) -> None:
        """Take one operator message; ignores anything that is not valid JSON of the contract."""
        try:
            body = json.loads(payload)
        except ValueError:
            return
        if not isinstance(body, dict):
            return
        if topic.startswith(self.topics.fleet_device("")):
            device = topic.rsplit("/", 1)[-1]
            self.devices[device] = body
        elif topic.startswith(self.topics.event("")):
            self.events.append(_event_line(body))

    def render(self) -> str:
        """The table and the latest events, as text."""
        rows = [COLUMNS] + [_row(self.devices[d]) for d in sorted(self.devices)]
        widths = [max(len(str(row[i])) for row in rows) for i in range(len(COLUMNS))]
        lines = ["  ".join(str(v).rjust(w) if i >= 3 and i < 7 else str(v).ljust(w)
                           for i, (v, w) in enumerate(zip(row, widths, strict=True)))
                 for row in rows]  # fmt: skip
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append("")
        lines.append("recent events:" if self.events else "no events yet")
        lines.extend(f"  {e}" for e in self.events)
        return "\n".join(lines)


def _row(state: dict[str, Any]) -> tuple[str, ...]:
    rate = state.get("rate_permille")
    last = str(state.get("last_report_at") or "-")
    return (
        str(state.get("device", "?")),
        str(state.get("account", "")),
        str(state.get("state", "?")),
        f"{rate / 10:.0f}%" if isinstance(rate, int) else "?",
        str(state.get("balance", "?")),
        str(state.get("allocation", "?")),
        str(state.get("used", "?")),
        last[11:19] if len(last) >= 19 else last,
    )


def _event_line(event: dict[str, Any]) -> str:
    at = str(event.get("at", ""))[11:19]
    extra = {k: v for k, v in event.items() if k not in ("type", "device", "at", "detail")}
    details = " ".join(f"{k}={v}" for k, v in extra.items())
    return f"{at} {event.get('type', '?'):<14} {event.get('device', '?'):<16} {details}"


async def watch(
    broker: str, prefix: str, *, refresh: float = 1.0, duration: float | None = None,
    out: TextIO = sys.stdout,
) -> None:  # fmt: skip
    """Show the fleet table, redrawn every ``refresh`` seconds, until cancelled or ``duration``."""
    view = FleetView(Topics(prefix))
    inbox: asyncio.Queue[Incoming] = asyncio.Queue()
    client = MqttClient(BrokerUrl.parse(broker), "", inbox=inbox)
    client.subscribe(view.topics.all_fleet_devices)
    client.subscribe(view.topics.all_events)
    await client.connect()
    loop = asyncio.get_running_loop()
    deadline = None if duration is None else loop.time() + duration
    try:
        while deadline is None or loop.time() < deadline:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(refresh):
                    while True:
                        message = await inbox.get()
                        view.apply(message.topic, message.payload)
            draw(view, out)
    finally:
        await client.disconnect()


def draw(view: FleetView, out: TextIO) -> None:
    """Redraw in place on a terminal; append otherwise."""
    if out.isatty():
        out.write("\x1b[H\x1b[2J")
    out.write(view.render() + "\n\n")
    out.flush()
