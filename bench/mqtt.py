"""The benchmark's MQTT clients: the one place in ``bench/`` that uses paho-mqtt directly.

A bare paho subscriber is the *receive floor* (what paho alone can drain, nothing done
per message); paho also queues the backlogs. The latency phase's clients (the paced
publisher, the recorders) are the lean ones of :mod:`bench.raw_mqtt`: they share the
cores with the gateway they time, and stamp each message as its bytes are written or
read, not when an event loop gets round to it.

All clients speak MQTT 3.1.1 (paho receives faster over it than over MQTT 5). Every wait
has a timeout and raises :class:`BenchError` when it runs out.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from bench import raw_mqtt
from gateway.mqtt import BrokerUrl, Incoming, MqttClient


class BenchError(RuntimeError):
    """A phase of the benchmark could not complete (timeout, a process died, bad counts)."""


def _client(url: str, client_id: str = "", *, persistent: bool = False) -> paho.Client:
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=not persistent,
        protocol=paho.MQTTv311,
    )
    # No in-flight limit in paho (the broker has its own; :class:`_Window` bounds ours):
    # with one, paho rescans its whole outgoing queue on every PUBACK, which halves the
    # publishing rate (78 against 37 us of CPU a message, measured).
    client.max_inflight_messages_set(0)
    client.max_queued_messages_set(0)
    return client


@contextmanager
def _connected(
    url: str,
    client: paho.Client,
    timeout: float,
    on_ready: Callable[[], None] | None = None,
) -> Iterator[paho.Client]:
    """Connect ``client``, run its network thread, wait for CONNACK (then ``on_ready`` runs
    on paho's thread); disconnect and stop on exit. Nagle's algorithm stays on: coalescing
    small packets makes bulk publishing and draining faster (measured); the clients that
    time single messages are in :mod:`bench.raw_mqtt`."""
    address = BrokerUrl.parse(url)
    accepted = threading.Event()

    def on_connect(client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if not reason.is_failure:
            if on_ready is not None:
                on_ready()
            accepted.set()

    client.on_connect = on_connect
    client.connect(address.host, address.port, keepalive=60)
    client.loop_start()
    try:
        if not accepted.wait(timeout):
            raise BenchError(f"broker {address} did not accept a connection in {timeout:g} s")
        yield client
    finally:
        client.disconnect()
        client.loop_stop()


def _wait(event: threading.Event, timeout: float, what: Callable[[], str]) -> None:
    if not event.wait(timeout):
        raise BenchError(f"timed out after {timeout:g} s: {what()}")


def register_session(url: str, client_id: str, topic_filter: str, timeout: float = 10) -> None:
    """Create the persistent session ``client_id`` subscribed (QoS 1) to ``topic_filter``
    and leave it, so the broker queues what is published there until it returns."""
    subscribed = threading.Event()
    client = _client(url, client_id, persistent=True)
    client.on_subscribe = lambda *_: subscribed.set()

    def subscribe() -> None:
        client.subscribe(topic_filter, 1)

    with _connected(url, client, timeout, subscribe):
        _wait(subscribed, timeout, lambda: f"no SUBACK for {topic_filter}")


class _Window:
    """At most ``size`` QoS 1 publishes awaiting their PUBACK.

    paho numbers messages with 16-bit ids and keys its outgoing queue by them: past
    65,535 unacknowledged publishes, new ones overwrite old ones and are lost silently.
    """

    def __init__(self, total: int, size: int = 10_000) -> None:
        self.total = total
        self.acked = 0
        self.done = threading.Event()
        self._free = threading.Semaphore(size)
        if total == 0:
            self.done.set()

    def on_publish(self, client: paho.Client, userdata: Any, mid: int, *_: Any) -> None:
        """paho's thread: one more PUBACK."""
        self.acked += 1
        self._free.release()
        if self.acked == self.total:
            self.done.set()

    def reserve(self, timeout: float) -> None:
        """Wait for room for one more publish."""
        if not self._free.acquire(timeout=timeout):
            raise BenchError(f"no PUBACK for {timeout:g} s ({self.acked} of {self.total})")

    def wait(self, timeout: float) -> None:
        """Wait for every PUBACK."""
        _wait(self.done, timeout, lambda: f"broker acknowledged {self.acked} of {self.total}")


def publish_all(url: str, messages: Sequence[tuple[str, bytes]], timeout: float = 300) -> float:
    """Publish ``(topic, payload)`` messages at QoS 1 as fast as paho goes, and wait until
    the broker has acknowledged every one; returns the seconds it took."""
    window = _Window(len(messages))
    client = _client(url)
    client.on_publish = window.on_publish
    with _connected(url, client, 10):
        start = time.perf_counter()
        for topic, payload in messages:
            window.reserve(timeout)
            client.publish(topic, payload, qos=1)
        window.wait(timeout)
        return time.perf_counter() - start


@dataclass(frozen=True, slots=True)
class Drained:
    """A timed drain: ``count`` messages in ``seconds``, costing ``cpu_seconds`` of ours."""

    count: int
    seconds: float
    cpu_seconds: float

    @property
    def rate(self) -> float:
        return self.count / self.seconds


def drain_bare(
    url: str, client_id: str, topic_filter: str, expected: int, timeout: float = 300
) -> Drained:
    """The receive floor: resume persistent session ``client_id`` (made by
    :func:`register_session`, its backlog queued) with a subscriber that acknowledges
    automatically and only counts; time from CONNACK to the ``expected``-th message."""
    count = [0]
    done = threading.Event()
    connected = [0.0, 0.0]  # wall clock, CPU clock at CONNACK

    def on_message(client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        count[0] += 1
        if count[0] == expected:
            done.set()

    def on_ready() -> None:
        connected[:] = [time.perf_counter(), time.process_time()]

    client = _client(url, client_id, persistent=True)
    client.on_message = on_message
    with _connected(url, client, 10, on_ready):
        _wait(done, timeout, lambda: f"bare subscriber received {count[0]} of {expected}")
        seconds = time.perf_counter() - connected[0]
        cpu = time.process_time() - connected[1]
    return Drained(expected, seconds, cpu)


def drain_reader(
    url: str, client_id: str, topic_filter: str, expected: int, timeout: float = 300
) -> Drained:
    """The gateway's own receive floor: as :func:`drain_bare`, but with the client the
    gateway receives with (``gateway.mqtt.MqttClient``: messages taken out of the byte
    stream before paho, the PUBACKs of a turn of its loop in one write), only counting."""
    return asyncio.run(_drain_reader(url, client_id, topic_filter, expected, timeout))


class _Counting:
    """Stands in for the client's inbox: counts what is put in it, keeps nothing."""

    def __init__(self, expected: int) -> None:
        self.count, self.expected, self.done = 0, expected, asyncio.Event()

    def put_nowait(self, message: Incoming) -> None:
        self.count += 1
        if self.count == self.expected:
            self.done.set()


async def _drain_reader(
    url: str, client_id: str, topic_filter: str, expected: int, timeout: float
) -> Drained:
    counting = _Counting(expected)
    connected = [0.0, 0.0]  # wall clock, CPU clock at CONNACK

    def on_ready() -> None:
        connected[:] = [time.perf_counter(), time.process_time()]

    inbox = cast("asyncio.Queue[Incoming]", counting)
    client = MqttClient(
        BrokerUrl.parse(url), client_id, persistent=True, inbox=inbox, on_connect=on_ready
    )
    client.subscribe(topic_filter)
    await client.connect()
    try:
        await asyncio.wait_for(counting.done.wait(), timeout)
    except TimeoutError:
        raise BenchError(f"the gateway's client received {counting.count} of {expected}") from None
    finally:
        seconds = time.perf_counter() - connected[0]
        cpu = time.process_time() - connected[1]
        await client.disconnect()
    return Drained(expected, seconds, cpu)


@dataclass(slots=True)
class Arrival:
    """A message received by a :class:`Recorder`, stamped (``time.time()``) on arrival."""

    at: float
    topic: str
    payload: bytes


@dataclass
class Recorder:
    """Keeps every message a subscriber receives, stamped as its bytes were read."""

    keep: bool = True  # False: stamps only, no topic or payload (for floods of messages)
    arrivals: list[Arrival] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def record(self, topic: str, payload: bytes, at: float) -> None:
        """The subscriber's thread: one more message."""
        arrival = Arrival(at, topic, payload) if self.keep else Arrival(at, "", b"")
        with self.changed:
            self.arrivals.append(arrival)
            self.changed.notify_all()

    def wait_for(self, done: Callable[[list[Arrival]], bool], timeout: float, what: str) -> None:
        """Wait until ``done(arrivals)`` holds; raises :class:`BenchError` after ``timeout``."""
        with self.changed:
            if not self.changed.wait_for(lambda: done(self.arrivals), timeout):
                raise BenchError(f"timed out after {timeout:g} s waiting for {what}")

    def wait_quiet(self, quiet: float, timeout: float) -> None:
        """Wait until nothing has arrived for ``quiet`` seconds (at most ``timeout``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.changed:
                last = self.arrivals[-1].at if self.arrivals else 0.0
            if time.time() - last >= quiet:
                return
            time.sleep(quiet / 4)


@contextmanager
def recording(
    url: str, topic_filters: Sequence[str], *, keep: bool = True, timeout: float = 10
) -> Iterator[Recorder]:
    """A :class:`Recorder` subscribed (QoS 1, clean session) to ``topic_filters``, from
    the moment every SUBACK has come back until the block ends. It reads with the lean
    client of :mod:`bench.raw_mqtt`, not paho: in the latency phase it shares the cores
    with the gateway."""
    recorder = Recorder(keep)
    try:
        with raw_mqtt.subscribed(url, topic_filters, recorder.record, timeout):
            yield recorder
    except raw_mqtt.RawMqttError as exc:
        raise BenchError(str(exc)) from None


def publish_paced(
    url: str, messages: Sequence[tuple[str, bytes]], rate: float, timeout: float = 60
) -> list[float]:
    """Publish ``messages`` at QoS 1 at a steady ``rate`` a second, and wait for every
    PUBACK; returns when each was written to the socket (``time.time()``), in order.
    With the lean client of :mod:`bench.raw_mqtt` (paho's publishing took 0.4 of a core
    from the gateway at 8,500 messages a second)."""
    try:
        return raw_mqtt.publish_paced(url, messages, rate, timeout)
    except raw_mqtt.RawMqttError as exc:
        raise BenchError(str(exc)) from None
