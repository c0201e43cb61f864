"""MQTT 3.1.1 on a plain socket: the latency phase's load generator and recorders.

The latency phase runs on the same two cores as the gateway, so what the benchmark's own
clients spend is taken from the gateway and shows up in its delays. paho spends about
50 µs of Python on each QoS 1 message it publishes and more on each it receives (at
8,500 reports/s the paced publisher alone kept 0.4 of a core busy, measured); this client
writes PUBLISH packets built before the clock starts, a whole burst in one system call,
and reads what arrives with the gateway's own decoder (:mod:`gateway.mqtt_packets`), a
few microseconds each.

It speaks only what the benchmark needs: CONNECT with a clean session, SUBSCRIBE at
QoS 1, PUBLISH at QoS 1 (and receiving QoS 0 and 1), PUBACK both ways. The keep-alive is
long enough (``KEEPALIVE``) that no phase needs a ping.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress

from gateway.mqtt import BrokerUrl
from gateway.mqtt_packets import PacketBuffer, Publish

KEEPALIVE = 900  # seconds; the broker drops a silent client after 1.5 times this
CONNACK, SUBACK, PUBACK = 0x20, 0x90, 0x40  # first bytes (type and flags)
WINDOW = 20_000  # QoS 1 publishes awaiting their PUBACK at most (ids are 16-bit)
READ_SIZE = 1 << 16
# The paced publisher sleeps at least this long between writes, so it wakes at most a
# thousand times a second whatever the rate. Woken for every message, it took 0.2 of a
# core at 6,000 /s (3,000 wake-ups a second): a tenth of the two cores it shares with the
# gateway; at 1 ms it takes 0.09-0.10 (docs/performance.md, twelfth session). The load
# stays steady on every scale above a millisecond, and a fleet of independent devices
# arrives burstier than that anyway.
PACE_TICK = 0.001  # s


class RawMqttError(RuntimeError):
    """The broker refused us, closed the connection, or did not answer in time."""


def _length(value: int) -> bytes:
    """MQTT's remaining length: seven bits a byte, low first, high bit for "more"."""
    out = bytearray()
    while True:
        value, byte = divmod(value, 128)
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _string(text: str) -> bytes:
    data = text.encode()
    return len(data).to_bytes(2, "big") + data


def mqtt_packet(first: int, body: bytes) -> bytes:
    """An MQTT packet: its first byte, the remaining length, ``body``."""
    return bytes((first,)) + _length(len(body)) + body


def connect_packet(client_id: str, keepalive: int = KEEPALIVE) -> bytes:
    """CONNECT, MQTT 3.1.1, clean session."""
    return mqtt_packet(0x10, _string("MQTT") + bytes((4, 0x02)) + keepalive.to_bytes(2, "big")
                   + _string(client_id))  # fmt: skip


def subscribe_packet(mid: int, topic_filter: str, qos: int = 1) -> bytes:
    return mqtt_packet(0x82, mid.to_bytes(2, "big") + _string(topic_filter) + bytes((qos,)))


def publish_packet(topic: str, payload: bytes, mid: int) -> bytes:
    """PUBLISH at QoS 1, not retained, with message id ``mid`` (1 to 65,535)."""
    return mqtt_packet(0x32, _string(topic) + mid.to_bytes(2, "big") + payload)


def puback_packet(mid: int) -> bytes:
    return bytes((PUBACK, 2)) + mid.to_bytes(2, "big")


def message_id(index: int) -> int:
    """The id of the ``index``-th publish: 1 to 65,535, round and round."""
    return index % 65_535 + 1


class Connection:
    """One connected socket and what has been read from it but not yet taken."""

    def __init__(self, url: str, client_id: str = "", timeout: float = 10) -> None:
        address = BrokerUrl.parse(url)
        self.sock = socket.create_connection((address.host, address.port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = PacketBuffer()
        try:
            self.sock.sendall(connect_packet(client_id))
            ack = self.next_packet(timeout)
            if not isinstance(ack, bytes) or ack[:1] != bytes((CONNACK,)) or ack[-1:] != b"\0":
                raise RawMqttError(f"broker {address} refused the connection: {ack!r}")
        except BaseException:
            self.sock.close()
            raise

    def next_packet(self, timeout: float) -> Publish | bytes:
        """The next whole packet, reading (blocking, up to ``timeout``) as needed."""
        deadline = time.monotonic() + timeout
        while (packet := self.buffer.next_packet()) is None:
            self.sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                data = self.sock.recv(READ_SIZE)
            except TimeoutError:
                raise RawMqttError(f"no packet from the broker in {timeout:g} s") from None
            if not data:
                raise RawMqttError("the broker closed the connection")
            self.buffer.feed(data)
        return packet

    def read_ready(self) -> None:
        """Read whatever the kernel holds, without waiting. (A socket with a timeout polls
        before every ``recv``, MSG_DONTWAIT or not: it is made non-blocking meanwhile.)"""
        timeout = self.sock.gettimeout()
        self.sock.setblocking(False)
        try:
            while True:
                try:
                    data = self.sock.recv(READ_SIZE)
                except (BlockingIOError, InterruptedError):
                    return
                if not data:
                    raise RawMqttError("the broker closed the connection")
                self.buffer.feed(data)
                if len(data) < READ_SIZE:
                    return
        finally:
            self.sock.settimeout(timeout)

    def close(self) -> None:
        with suppress(OSError):
            self.sock.sendall(b"\xe0\x00")  # DISCONNECT
        self.sock.close()


class _Acks:
    """Counts the PUBACKs a publishing connection has read."""

    def __init__(self, connection: Connection) -> None:
        self.connection, self.count = connection, 0

    def take(self) -> None:
        """Count the PUBACKs already read."""
        while (packet := self.connection.buffer.next_packet()) is not None:
            self._count(packet)

    def wait(self, count: int, timeout: float) -> None:
        """Read until ``count`` PUBACKs have come in all."""
        deadline = time.monotonic() + timeout
        while self.count < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RawMqttError(f"the broker acknowledged {self.count} of {count}")
            self._count(self.connection.next_packet(left))  # what is held comes first

    def _count(self, packet: Publish | bytes) -> None:
        """One more PUBACK; anything else from the broker is an error."""
        if not isinstance(packet, bytes) or packet[0] != PUBACK:
            raise RawMqttError(f"unexpected packet while publishing: {packet!r}")
        self.count += 1


def publish_paced(
    url: str, messages: Sequence[tuple[str, bytes]], rate: float, timeout: float = 60
) -> list[float]:
    """Publish ``messages`` at QoS 1 at a steady ``rate`` a second, and wait for every
    PUBACK; returns when each was written to the socket (``time.time()``), in order.

    Every message is written once it is due (``index / rate`` seconds after the start),
    together with any others due by then, in one system call; in between the publisher
    sleeps, at least :data:`PACE_TICK` (a message waits up to that long for its write). So
    the offered load follows the schedule however long a write took, and a stamp is the
    moment its bytes went to the kernel.
    """
    packets = [publish_packet(t, p, message_id(i)) for i, (t, p) in enumerate(messages)]
    stamps = [0.0] * len(packets)
    connection = Connection(url)
    acks = _Acks(connection)
    try:
        start, sent, total = time.perf_counter(), 0, len(packets)
        while sent < total:
            due = min(total, int((time.perf_counter() - start) * rate) + 1)
            if due <= sent:
                time.sleep(max(PACE_TICK, start + sent / rate - time.perf_counter()))
                continue
            if sent - acks.count >= WINDOW:  # no room: wait for the oldest to be confirmed
                acks.wait(sent - WINDOW + 1, timeout)
                continue
            due = min(due, acks.count + WINDOW)
            stamps[sent:due] = [time.time()] * (due - sent)
            connection.sock.sendall(b"".join(packets[sent:due]))
            sent = due
            connection.read_ready()
            acks.take()
        acks.wait(total, timeout)
    finally:
        connection.close()
    return stamps


class Subscriber:
    """A connection subscribed at QoS 1, read on a thread of its own: every message is
    handed to ``on_message(topic, payload, at)`` with ``at`` (``time.time()``) taken when
    its bytes were read, and acknowledged."""

    def __init__(
        self,
        url: str,
        topic_filters: Sequence[str],
        on_message: Callable[[str, bytes, float], None],
    ) -> None:
        self._connection = Connection(url)
        self._on_message = on_message
        self._subscribed = threading.Semaphore(0)
        self._filters = list(topic_filters)
        self._thread = threading.Thread(target=self._read, name="bench-subscriber", daemon=True)
        self.error: BaseException | None = None

    def start(self, timeout: float) -> None:
        """Subscribe to every filter and wait for each SUBACK."""
        self._thread.start()
        packets = [subscribe_packet(i + 1, f) for i, f in enumerate(self._filters)]
        self._connection.sock.sendall(b"".join(packets))
        for topic_filter in self._filters:
            if not self._subscribed.acquire(timeout=timeout):
                raise RawMqttError(f"no SUBACK for {topic_filter}: {self.error!r}")

    def _read(self) -> None:
        sock, buffer = self._connection.sock, self._connection.buffer
        sock.settimeout(None)
        try:
            while data := sock.recv(READ_SIZE):
                at = time.time()
                buffer.feed(data)
                acks = []
                while (packet := buffer.next_packet()) is not None:
                    if isinstance(packet, Publish):
                        self._on_message(packet.topic, packet.payload, at)
                        if packet.qos:
                            acks.append(puback_packet(packet.mid))
                    elif packet[0] == SUBACK:
                        self._subscribed.release()
                if acks:
                    sock.sendall(b"".join(acks))
        except OSError as exc:  # closed by stop(), or by the broker
            self.error = exc

    def stop(self) -> None:
        with suppress(OSError):
            self._connection.sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)
        self._connection.close()


@contextmanager
def subscribed(
    url: str,
    topic_filters: Sequence[str],
    on_message: Callable[[str, bytes, float], None],
    timeout: float = 10,
) -> Iterator[Subscriber]:
    """A :class:`Subscriber`, from the moment every SUBACK has come back until the block
    ends."""
    subscriber = Subscriber(url, topic_filters, on_message)
    try:
        subscriber.start(timeout)
        yield subscriber
    finally:
        subscriber.stop()
