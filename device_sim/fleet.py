"""The fleet runner: many simulated devices in one process over one MQTT connection.

Each device publishes signed usage reports (QoS 1) on ``P/devices/{id}/usage`` and obeys
the signed control messages it receives on ``P/devices/{id}/control``. Reports pass
through an optional :class:`~device_sim.faults.FaultPlan`, which only ever *adds*
messages, so the gateway's charged total still equals ``charged(expected_counters())``.
On every (re)connect each device publishes a fresh report (contract §4).

Two ways to drive it: :meth:`Fleet.tick` lets the caller decide time (tests, benchmark);
:meth:`Fleet.run` follows the real clock (the CLI, the demo) and is the only method that
reads it, apart from the injectable ``clock`` that stamps reports (``t``).

Waiting is event-driven: :meth:`Fleet.flush` waits for the broker's PUBACKs,
:meth:`Fleet.wait_for_control` on a condition notified when a control message is applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from device_sim.device import ControlOutcome, SimDevice, make_devices
from device_sim.faults import FaultKind, FaultPlan, Publication
from device_sim.store import save_fleet
from gateway.mqtt import BrokerUrl, Incoming, MqttClient
from gateway.topics import Topics
from gateway.wire import ControlMessage

__all__ = ["DEFAULT_PREFIX", "Fleet", "FleetSummary", "make_devices", "wall_clock_ms"]

DEFAULT_PREFIX: Final = "tokens/v1"
STEP_CHECKS: Final = 4  # in live mode, looks per interval for devices whose counter crossed a step
UNVERIFIABLE: Final = "unverifiable"  # a control message received while no gateway key is known


def wall_clock_ms() -> int:
    """The real clock, in ms since the Unix epoch: what stamps reports by default."""
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class FleetSummary:
    """Counts since the fleet started, for the CLI's one-line progress report."""

    devices: int
    reports: int  # genuine reports
    messages: int  # everything published: reports and injected faults
    throttled: int
    blocked: int
    injected: Mapping[str, int] = field(default_factory=dict)
    control: Mapping[str, int] = field(default_factory=dict)  # ControlOutcome -> count

    def line(self) -> str:
        faults = " ".join(f"{kind}={n}" for kind, n in self.injected.items() if n) or "none"
        control = " ".join(f"{kind}={n}" for kind, n in sorted(self.control.items())) or "none"
        return (
            f"{self.devices} devices: {self.reports} reports, {self.messages} messages"
            f" | faults {faults} | {self.throttled} throttled, {self.blocked} blocked"
            f" | control {control}"
        )


class Fleet:
    """Simulated devices sharing one (non-persistent) MQTT connection.

    Build it with :meth:`create`, then ``await start()``; ``await stop()`` when done.
    """

    def __init__(
        self,
        devices: Sequence[SimDevice],
        broker_url: BrokerUrl,
        gateway_key: Ed25519PublicKey | None,
        topics: Topics,
        faults: FaultPlan,
        store_path: Path | None,
        clock: Callable[[], int],
    ) -> None:
        self.devices = {device.device_id: device for device in devices}
        self._by_control_topic = {topics.control(d.device_id): d for d in devices}
        self._url, self._gateway_key, self._topics = broker_url, gateway_key, topics
        self._faults, self._store_path, self._clock = faults, store_path, clock
        self._client: MqttClient | None = None
        self._inbox: asyncio.Queue[Incoming] = asyncio.Queue()
        self._control_task: asyncio.Task[None] | None = None
        self._control_applied = asyncio.Condition()
        self._control_outcomes: Counter[str] = Counter()
        self._unacked: Counter[int] = Counter()  # message id -> publishes awaiting PUBACK
        self._all_acked = asyncio.Event()
        self._all_acked.set()
        self._expected: dict[str, dict[int, dict[str, int]]] = {}
        self._reports = self._messages = 0

    @classmethod
    def create(
        cls,
        devices: Sequence[SimDevice],
        broker_url: BrokerUrl,
        gateway_key: Ed25519PublicKey | None,
        prefix: str = DEFAULT_PREFIX,
        faults: FaultPlan | None = None,
        store_path: Path | None = None,
        *,
        clock: Callable[[], int] = wall_clock_ms,
    ) -> Fleet:
        """A fleet of ``devices`` (unique ids, else ValueError); nothing connects yet.

        Without a ``gateway_key`` every control message is ignored (counted as
        ``unverifiable``). ``store_path``: where the devices' state is saved before each
        batch of reports and at :meth:`stop`. ``clock``: stamps reports, ms since the epoch.
        """
        if len({device.device_id for device in devices}) != len(devices):
            raise ValueError("device ids must be unique")
        plan = faults if faults is not None else FaultPlan()
        return cls(devices, broker_url, gateway_key, Topics(prefix), plan, store_path, clock)

    # --- lifecycle ------------------------------------------------------------------

    async def start(self, timeout: float = 10.0) -> None:
        """Connect, subscribe every control topic, publish a fresh report per device.

        Raises :class:`~gateway.errors.BrokerError` if no connection is made in ``timeout`` s.
        """
        if self._client is not None:
            raise RuntimeError("the fleet is already started")
        client = MqttClient(
            self._url,
            f"tokenwell-sim-{uuid.uuid4().hex[:12]}",
            inbox=self._inbox,
            on_connect=self._on_connect,
            on_published=self._on_published,
        )
        for topic in self._by_control_topic:
            client.subscribe(topic, 1)
        self._client = client
        self._control_task = asyncio.create_task(self._apply_controls(), name="sim-control")
        try:
            await client.connect(timeout)
        except BaseException:
            self._client = None
            await _cancel(self._control_task)
            raise

    async def stop(self, timeout: float = 5.0) -> None:
        """Release held reports, wait (up to ``timeout`` s) for their PUBACKs if connected,
        disconnect, and save the store. Safe to call twice.
        """
        client, self._client = self._client, None
        if client is not None:
            if client.connected.is_set():
                self._send_all(self._faults.drain(), client)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._all_acked.wait(), timeout)
            await _cancel(self._control_task)
            await client.disconnect()
        self._save()

    # --- driving --------------------------------------------------------------------

    def advance(self, seconds: float) -> None:
        """Let every device consume for ``seconds`` at its permitted rate; publishes nothing."""
        for device in self.devices.values():
            device.advance(seconds)

    def publish_reports(
        self, now_ms: int, *, only_stepped: bool = False, silent: Collection[str] = ()
    ) -> int:
        """Publish a report from every device (or only from those whose counter crossed a
        step), except the ``silent`` ones (cut off from the network), stamped ``now_ms``;
        returns how many. The store is saved before publishing.
        """
        client = self._connection()
        devices = [
            d
            for d in self.devices.values()
            if (not only_stepped or d.step_crossed()) and d.device_id not in silent
        ]
        payloads = [(device, device.report(now_ms)) for device in devices]
        if payloads:
            self._save()  # a device persists what it reports before it reports it
        for device, payload in payloads:
            self._expected.setdefault(device.device_id, {})[device.boot] = dict(device.reported)
            self._reports += 1
            self._send_all(
                self._faults.process(self._topics.usage(device.device_id), payload), client
            )
        return len(payloads)

    def tick(self, seconds: float, now_ms: int) -> None:
        """Advance every device by ``seconds``, then publish one report each, at ``now_ms``."""
        self.advance(seconds)
        self.publish_reports(now_ms)

    async def run(self, interval: float = 1.0, duration: float | None = None) -> None:
        """Live mode: every ``interval`` s of real time, advance and report (devices with a
        step also report sooner when they cross it). Returns after ``duration`` s, or runs
        until cancelled when it is None.
        """
        if interval <= 0 or (duration is not None and duration < 0):
            raise ValueError("interval must be positive and duration not negative")
        checks = STEP_CHECKS if any(d.step > 0 for d in self.devices.values()) else 1
        started = last = time.monotonic()
        end = math.inf if duration is None else started + duration
        beat = 0
        while last < end:
            beat += 1
            await asyncio.sleep(min(started + beat * interval / checks, end) - time.monotonic())
            now = time.monotonic()
            self.advance(now - last)
            last = now
            self.publish_reports(self._clock(), only_stepped=beat % checks != 0 and now < end)

    # --- waiting --------------------------------------------------------------------

    async def flush(self, timeout: float = 10.0) -> None:
        """Release held-back reports, then wait until the broker has acknowledged every
        publish so far. Raises TimeoutError after ``timeout`` s.
        """
        self._send_all(self._faults.drain(), self._connection())
        await asyncio.wait_for(self._all_acked.wait(), timeout)

    async def wait_for_control(
        self, device_id: str, predicate: Callable[[ControlMessage], bool], timeout: float = 10.0
    ) -> ControlMessage:
        """Wait until ``device_id`` has applied a control message satisfying ``predicate``
        (the one already applied counts); returns it. Raises KeyError for an unknown
        device, TimeoutError after ``timeout`` s.
        """
        device = self.devices[device_id]

        def satisfied() -> bool:
            return device.control is not None and predicate(device.control)

        async with self._control_applied:
            await asyncio.wait_for(self._control_applied.wait_for(satisfied), timeout)
        assert device.control is not None  # satisfied() said so
        return device.control

    # --- what happened --------------------------------------------------------------

    def expected_counters(self) -> dict[str, dict[int, dict[str, int]]]:
        """{device: {boot epoch: {meter: count}}}: the last counters each device reported
        in each epoch, i.e. what the gateway must end up charging for.
        """
        return {
            device: {boot: dict(counters) for boot, counters in boots.items()}
            for device, boots in self._expected.items()
        }

    def summary(self) -> FleetSummary:
        """Counts since the fleet was created."""
        rates = [device.permille for device in self.devices.values()]
        return FleetSummary(
            devices=len(rates),
            reports=self._reports,
            messages=self._messages,
            throttled=sum(1 for rate in rates if 0 < rate < 1000),
            blocked=rates.count(0),
            injected={str(kind): self._faults.injected[kind] for kind in FaultKind},
            control={str(outcome): n for outcome, n in self._control_outcomes.items()},
        )

    # --- internals ------------------------------------------------------------------

    def _connection(self) -> MqttClient:
        if self._client is None:
            raise RuntimeError("the fleet is not started")
        return self._client

    def _on_connect(self) -> None:
        """Runs on the event loop at every (re)connect: every device re-sends the last
        reports of its previous boot epochs, then a fresh report."""
        if self._client is not None:  # not while stopping
            self.resend_tails()
            self.publish_reports(self._clock())

    def resend_tails(self) -> int:
        """Publish again each device's kept last reports of earlier epochs; returns how many.

        Harmless when they were charged already (the gateway debits nothing twice), and
        the only way to recover them when a broker crash lost them after a reset.
        """
        tails = [
            Publication(self._topics.usage(device.device_id), tail)
            for device in self.devices.values()
            for tail in device.tails
        ]
        self._send_all(tails, self._connection())
        return len(tails)

    def _send_all(self, publications: Iterable[Publication], client: MqttClient) -> None:
        for publication in publications:
            mid = client.publish(publication.topic, publication.payload, qos=1)
            self._unacked[mid] += 1
            self._messages += 1
            self._all_acked.clear()

    def _on_published(self, mid: int) -> None:
        if self._unacked[mid] > 1:
            self._unacked[mid] -= 1
        else:
            self._unacked.pop(mid, None)
        if not self._unacked:
            self._all_acked.set()

    async def _apply_controls(self) -> None:
        while True:
            incoming = await self._inbox.get()
            outcome = self._apply_control(incoming)
            self._control_outcomes[outcome] += 1
            if outcome == ControlOutcome.APPLIED:
                async with self._control_applied:
                    self._control_applied.notify_all()

    def _apply_control(self, incoming: Incoming) -> str:
        device = self._by_control_topic.get(incoming.topic)
        if device is None:  # not a topic we subscribed to: nothing to apply it to
            return ControlOutcome.OTHER_DEVICE
        if self._gateway_key is None:
            return UNVERIFIABLE
        return device.apply_control(incoming.payload, self._gateway_key)

    def _save(self) -> None:
        if self._store_path is not None:
            save_fleet(self._store_path, self.devices.values())


async def _cancel(task: asyncio.Task[None] | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
