"""The one place paho-mqtt is used: a thin asyncio-facing MQTT client.

paho runs its network loop in its own thread. It crosses into asyncio at exactly one
point: its callbacks only hand values to the event loop with ``call_soon_threadsafe``,
batched by :class:`_Handoff` (aiosqlite's ``core.py`` does the same for its worker
thread). Nothing else here touches
asyncio objects from paho's thread. ``publish`` and ``ack`` are safe to call from the
event loop: paho appends to a thread-safe deque and wakes its loop through a socket pair.

MQTT 3.1.1 is used: paho receives noticeably faster over it than over MQTT 5, and all the
contract needs (QoS 1, retain, persistent sessions) is in 3.1.1. Subscriptions are
(re)made in the connect callback, so an automatic reconnect keeps them.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from gateway.errors import BrokerError, ConfigError

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class BrokerUrl:
    """A parsed ``mqtt://[user:pass@]host[:port]`` or ``mqtts://...`` URL."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> BrokerUrl:
        """Parse a broker URL; raises :class:`ConfigError` naming what is wrong."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise ConfigError(f"broker URL {url!r}: {exc}") from None
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ConfigError(f"broker URL {url!r}: want mqtt://host[:port] or mqtts://...")
        tls = parts.scheme == "mqtts"
        return cls(
            host=parts.hostname,
            port=port or (8883 if tls else 1883),
            tls=tls,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
        )

    def __str__(self) -> str:  # never prints the password
        user = f"{self.username}@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Incoming:
    """One received PUBLISH, stamped with the connection (``session``) it arrived on.

    ``vouched_by``: the public key its signature was found valid with on the way in
    (gateway.receiver), if any.
    """

    topic: str
    payload: bytes
    mid: int
    qos: int
    retain: bool
    session: int = 0
    vouched_by: bytes | None = None


def _no_delay(sock: Any) -> None:
    """Turn Nagle's algorithm off: paho leaves it on, so each small packet (a PUBACK, a
    control message) waits for the broker's delayed ACK, up to 40 ms on Linux."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Handoff(Generic[T]):
    """Hands items from paho's thread to the event loop in batches.

    One ``call_soon_threadsafe`` (one self-pipe write, one loop wake-up) per batch rather
    than per message: under load, many messages arrive between two turns of the loop.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, deliver: Callable[[list[T]], None]) -> None:
        self._loop = loop
        self._deliver = deliver
        self._items: list[T] = []
        self._lock = threading.Lock()
        self._scheduled = False

    def put(self, item: T) -> None:
        """Called on paho's thread."""
        with self._lock:
            self._items.append(item)
            if self._scheduled:
                return
            self._scheduled = True
        self._loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self._lock:
            items, self._items = self._items, []
            self._scheduled = False
        self._deliver(items)


class MqttClient:
    """An MQTT connection delivering messages into an asyncio queue.

    ``persistent=True`` keeps the broker session (clean session off) under ``client_id``,
    so QoS 1 messages published while we are away are queued for us. ``manual_ack=True``
    withholds each PUBACK until :meth:`ack` is called: the broker redelivers anything not
    acknowledged when the session reconnects.
    """

    def __init__(
        self,
        url: BrokerUrl,
        client_id: str,
        *,
        persistent: bool = False,
        manual_ack: bool = False,
        inbox: asyncio.Queue[Incoming] | None = None,
        on_connect: Callable[[], None] | None = None,
        on_published: Callable[[int], None] | None = None,
        max_inflight: int = 0,
        max_unacknowledged: int | None = None,
    ) -> None:
        self._url = url
        self._loop = asyncio.get_running_loop()
        self._inbox = inbox
        self._received: _Handoff[Incoming] = _Handoff(self._loop, self._enqueue)
        self._acknowledged: _Handoff[int] = _Handoff(self._loop, self._confirmed)
        self._on_connect_hook = on_connect
        self._on_published_hook = on_published
        self._subscriptions: dict[str, int] = {}
        self._session = 0
        self._flow = threading.Condition()
        self._unacknowledged = 0  # received with manual_ack, not yet acknowledged
        self._max_unacknowledged = max_unacknowledged
        self._unconfirmed: set[int] = set()
        self._all_confirmed = asyncio.Event()
        self._all_confirmed.set()
        self.connected = asyncio.Event()
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=not persistent,
            protocol=paho.MQTTv311,
            manual_ack=manual_ack,
        )
        # 0: no limit. With one, paho scans its whole outgoing queue on every PUBACK
        # (78 against 37 us of CPU a publish); the fleet-state flush bounds what is in flight.
        self._client.max_inflight_messages_set(max_inflight)
        self._client.max_queued_messages_set(0)  # 0: unbounded; back-pressure is upstream
        self._client.reconnect_delay_set(min_delay=1, max_delay=8)
        if url.username:
            self._client.username_pw_set(url.username, url.password)
        if url.tls:
            self._client.tls_set_context(ssl.create_default_context())
        self._client.on_connect = self._handle_connect
        self._client.on_disconnect = self._handle_disconnect
        self._client.on_message = self._handle_message
        self._client.on_publish = self._handle_publish

    # --- paho thread: hand over to the loop, nothing else ----------------------------

    def _handle_connect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if reason.is_failure:
            return
        _no_delay(client.socket())
        with self._flow:
            self._unacknowledged = 0  # the broker re-sends what this connection left
        self._session += 1  # message ids of earlier connections mean nothing now
        for topic, qos in self._subscriptions.items():
            client.subscribe(topic, qos)
        self._loop.call_soon_threadsafe(self._set_connected)

    def _handle_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        self._loop.call_soon_threadsafe(self.connected.clear)

    def _handle_message(self, client: Any, userdata: Any, message: paho.MQTTMessage) -> None:
        if self._inbox is None:
            return
        try:
            topic = message.topic
        except UnicodeDecodeError:  # brokers refuse these; never let it kill paho's loop
            topic = ""
        payload, retain = bytes(message.payload), bool(message.retain)
        incoming = Incoming(topic, payload, message.mid, message.qos, retain, self._session)
        self._received.put(incoming)
        if self._max_unacknowledged is not None:
            self._hold_back(client)

    def _hold_back(self, client: Any) -> None:
        """Flow control of our own: with too many messages unacknowledged, stop reading
        (this is paho's reading thread) until acknowledgements catch up, so TCP pushes back
        on the broker. The broker's in-flight window should make this rare, but Mosquitto
        2.0 does not always keep to it."""
        with self._flow:
            self._unacknowledged += 1
            while self._unacknowledged >= (self._max_unacknowledged or 0) and client.is_connected():
                self._flow.wait(timeout=1.0)

    def _handle_publish(
        self, client: Any, userdata: Any, mid: int, reason: Any, props: Any
    ) -> None:
        self._acknowledged.put(mid)

    # --- event loop side ------------------------------------------------------------

    def _set_connected(self) -> None:
        self.connected.set()
        if self._on_connect_hook is not None:
            self._on_connect_hook()

    def _enqueue(self, messages: list[Incoming]) -> None:
        assert self._inbox is not None
        for message in messages:
            self._inbox.put_nowait(message)

    def _confirmed(self, mids: list[int]) -> None:
        self._unconfirmed.difference_update(mids)
        if not self._unconfirmed:
            self._all_confirmed.set()
        if self._on_published_hook is not None:
            for mid in mids:
                self._on_published_hook(mid)

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe now if connected, and again on every reconnect."""
        self._subscriptions[topic_filter] = qos
        if self.connected.is_set():
            self._client.subscribe(topic_filter, qos)

    async def connect(self, timeout: float = 10.0) -> None:
        """Connect (retrying in the background) and wait until the broker accepts us.

        Raises :class:`BrokerError` when no connection is made within ``timeout`` seconds.
        """
        try:
            self._client.connect_async(self._url.host, self._url.port, keepalive=30)
        except (OSError, ValueError) as exc:
            raise BrokerError(f"cannot connect to {self._url}: {exc}") from None
        self._client.loop_start()
        try:
            await asyncio.wait_for(self.connected.wait(), timeout)
        except TimeoutError:
            await self.disconnect()
            raise BrokerError(f"broker {self._url} unreachable after {timeout:g} s") from None

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int:
        """Queue a publish; returns its message id (reported to ``on_published`` on PUBACK)."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if qos > 0:
            self._unconfirmed.add(info.mid)
            self._all_confirmed.clear()
        return int(info.mid)

    @property
    def unconfirmed(self) -> int:
        """QoS 1 publishes the broker has not acknowledged yet."""
        return len(self._unconfirmed)

    async def flush(self, timeout: float = 10.0) -> bool:
        """Wait until the broker has confirmed every QoS 1 publish so far; False on timeout."""
        try:
            await asyncio.wait_for(self._all_confirmed.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def ack(self, message: Incoming) -> None:
        """Acknowledge a message received with ``manual_ack`` (see :meth:`acknowledge`)."""
        self.acknowledge(message.mid, message.qos, message.session)

    def acknowledge(self, mid: int, qos: int, session: int) -> None:
        """Acknowledge message ``mid`` received with ``manual_ack`` on connection
        ``session``: a PUBACK for QoS 1, nothing to send for QoS 0 (it only frees its place
        under ``max_unacknowledged``).

        Only on the connection it arrived on: after a reconnect its message id may name
        another message, and the broker redelivers the unacknowledged one anyway.
        """
        if session != self._session:
            return
        if qos > 0:
            self._client.ack(mid, qos)
        if self._max_unacknowledged is not None:
            with self._flow:
                self._unacknowledged -= 1
                self._flow.notify()

    async def disconnect(self, flush_timeout: float = 5.0) -> None:
        """Wait (up to ``flush_timeout``) for outstanding publishes, then DISCONNECT.

        paho drops what it has not written yet when it disconnects, so without the wait
        QoS 1 messages published just before would be lost.
        """
        if self.connected.is_set():
            await self.flush(flush_timeout)
        self._client.disconnect()
        await asyncio.to_thread(self._client.loop_stop)
        self.connected.clear()
