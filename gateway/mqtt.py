"""The one place paho-mqtt is used: a thin asyncio-facing MQTT client.

paho is driven by the asyncio event loop, not by a thread of its own (aiomqtt does the
same): its socket is registered with the loop (``add_reader``; ``add_writer`` while paho
has packets to write), ``loop_read`` / ``loop_write`` run when the socket is ready and
``loop_misc`` once a second for the keep-alive. So every callback runs on the loop,
publishing and acknowledging just queue packets that go out together, in one ``send``,
at the next turn of the loop (:func:`merge_queued`), and nothing crosses threads per
message: a paho thread cost twice the CPU a publication (a self-pipe write to wake it, a
lock and ``call_soon_threadsafe`` back, docs/performance.md). The one blocking step,
opening the TCP (and TLS) connection, runs on a worker thread; the socket callbacks it
triggers are handed to the loop.

paho keeps the connection (connecting, subscribing, keep-alive, publishing), but the
messages we are sent (QoS 0 and 1) and the broker's PUBACKs of what we publish do not go
through it: :class:`_Reader` takes them out of the byte stream first (decoded by
gateway.mqtt_packets, at a tenth of paho's CPU a message) and hands paho every other
packet.

MQTT 3.1.1 is used: paho receives noticeably faster over it than over MQTT 5, and all the
contract needs (QoS 1, retain, persistent sessions) is in 3.1.1. Subscriptions are
(re)made in the connect callback, so an automatic reconnect keeps them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from gateway.errors import BrokerError, ConfigError
from gateway.mqtt_packets import PacketBuffer, Publish

log = logging.getLogger("tokenwell.mqtt")
KEEPALIVE = 30  # seconds
MISC_INTERVAL = 1.0  # seconds between paho's keep-alive checks (``loop_misc``)
RECONNECT_DELAYS = (1.0, 2.0, 4.0, 8.0)  # after a lost connection or a failed attempt
READS_PER_TURN = 64  # ``loop_read`` calls in one turn of the loop at most
READ_AHEAD = 65536  # bytes asked of the kernel at once (see _Reader)
MERGE_BYTES = 65536  # queued packets merged into one of at most this size (merge_queued)
MERGE_SCAN_BYTES = 16 * MERGE_BYTES  # how far into paho's queue merge_queued looks
MESSAGES_PER_TURN = 256  # messages delivered in one turn of the loop at most
_PUBACK = struct.Struct(">BBH")  # fixed header (type, remaining length 2), message id
_PUBACK_HEAD = bytes((paho.PUBACK, 2))
DISCONNECT_TIMEOUT = 2.0  # seconds for the DISCONNECT to be written


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


class Incoming(NamedTuple):
    """One received PUBLISH, stamped with the connection (``session``) it arrived on.
    (A named tuple: one is built for every report, in each of the two processes.)

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


def merge_queued(out: deque[Any]) -> None:
    """Merge the runs of packets at the head of paho's outgoing queue ``out`` (its
    private ``_out_packet``) that paho does nothing with once written into packets of up
    to ``MERGE_BYTES``, in order, so that each goes out in one ``send``.

    paho writes each packet with a ``send`` of its own, and each is a TCP segment the
    broker wakes up for (Nagle is off): the fleet state's publications, 2,000 a second
    with 1,000 devices reporting, and each batch's control messages. A written QoS 1
    PUBLISH, a PUBACK, a SUBSCRIBE or a PINGREQ needs nothing more from paho (a PUBLISH
    is confirmed by its PUBACK, from ``_out_messages``); a QoS 0 PUBLISH (``on_publish``)
    and a DISCONNECT (closing) do, and stay packets of their own, as does a packet
    already partly written. Only the first ``MERGE_SCAN_BYTES`` are looked at, and merged
    packets stay small, so a backlog (a broker that reads slowly) costs no copying that
    grows with it. The queue is only taken from at its head and put back there: paho's
    connecting thread may append to it meanwhile. On a lost connection paho drops the
    queue (and re-sends unconfirmed publications from ``_out_messages``), merged or not.
    """
    done: list[Any] = []
    scanned = 0
    while out and scanned < MERGE_SCAN_BYTES:
        run = [out.popleft()]
        size = len(run[0]["packet"])
        if _mergeable(run[0]):
            while out and _mergeable(out[0]) and size + len(out[0]["packet"]) <= MERGE_BYTES:
                run.append(out.popleft())
                size += len(run[-1]["packet"])
        scanned += size
        done.append(run[0] if len(run) == 1 else _merged(run))
    out.extendleft(reversed(done))


def _mergeable(packet: dict[str, Any]) -> bool:
    kind = packet["command"] & 0xF0
    finished_by_paho = (kind == paho.PUBLISH and packet["qos"] == 0) or kind == paho.DISCONNECT
    return packet["pos"] == 0 and not finished_by_paho


def _merged(run: list[dict[str, Any]]) -> dict[str, Any]:
    data = b"".join([packet["packet"] for packet in run])
    return {"command": paho.PUBACK, "mid": 0, "qos": 0, "pos": 0, "to_process": len(data),
            "packet": data, "info": None}  # fmt: skip


class _Reader:
    """The socket as paho reads it, with the messages taken out first.

    What the kernel holds (up to ``READ_AHEAD`` bytes) is read in one system call and
    split into packets (:class:`~gateway.mqtt_packets.PacketBuffer`). PUBLISHes of QoS 0
    and 1 go straight to ``deliver``, in order, and the PUBACKs of our publications to
    ``confirm`` (which may leave one to paho); paho is handed every other packet, whole,
    as the bytes of its reads, so it stays at a packet boundary whenever its bytes run
    out. ``deliver`` returns False to stop taking packets (reading paused, or the turn's
    share used up); the rest stays held. Held bytes are no longer in the kernel, so the
    event loop cannot see them: :meth:`pending` counts them (with what TLS has
    decrypted), as ``ssl.SSLSocket``'s does, and the client reads again while it is not
    zero. Everything else goes to the socket.
    """

    __slots__ = (
        "_at", "_confirm", "_deliver", "_ended", "_packets", "_paho", "_sock", "handed",
        "received",
    )  # fmt: skip

    def __init__(
        self, sock: Any, deliver: Callable[[Publish], bool], confirm: Callable[[int], bool]
    ) -> None:
        self._sock = sock
        self._deliver = deliver
        self._confirm = confirm  # a PUBACK's message id: True if taken care of
        self._packets = PacketBuffer()
        self._paho = b""  # whole packets for paho, from _at on
        self._at = 0
        self._ended = False  # the socket said end of stream
        self.handed = 0  # packets handed to paho, or PUBACKs confirmed, so far
        self.received = 0  # bytes read from the socket so far

    def recv(self, size: int) -> bytes:
        """Up to ``size`` bytes of the packets meant for paho; raises what the socket
        raises when there are none (no data yet) and returns ``b""`` at the end of the
        stream, like ``socket.recv``."""
        if self._at >= len(self._paho):
            self._take()
        chunk = self._paho[self._at : self._at + size]
        if not chunk:
            if self._ended:
                return b""
            raise BlockingIOError
        self._at += len(chunk)
        return chunk

    def _take(self) -> None:
        """Deliver messages until the next packet for paho, a ``False`` from ``deliver``,
        or the end of what has arrived; reads the socket at most once."""
        packets, deliver, read = self._packets, self._deliver, False
        while True:
            packet = packets.next_packet()
            if packet is None:
                if read or self._ended:
                    return
                data = self._sock.recv(READ_AHEAD)  # raises when there is nothing
                self._ended, read = not data, True
                self.received += len(data)
                packets.feed(data)
            elif type(packet) is bytes:
                self.handed += 1
                head = packet[:2]
                if (
                    head == _PUBACK_HEAD
                    and len(packet) == 4
                    and self._confirm(packet[2] << 8 | packet[3])
                ):
                    continue
                self._paho, self._at = packet, 0
                return
            elif not deliver(packet):  # type: ignore[arg-type]
                return

    def pending(self) -> int:
        """Bytes readable without waiting for the kernel: held here, or decrypted by TLS."""
        inner = getattr(self._sock, "pending", None)
        held = len(self._packets) + len(self._paho) - self._at
        return held + (inner() if inner is not None else 0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class MqttClient:
    """An MQTT connection delivering messages into an asyncio queue.

    ``persistent=True`` keeps the broker session (clean session off) under ``client_id``,
    so QoS 1 messages published while we are away are queued for us. ``manual_ack=True``
    withholds each PUBACK until :meth:`ack` is called: the broker redelivers anything not
    acknowledged when the session reconnects. With ``max_unacknowledged``, reading stops
    while that many received messages are unacknowledged (TCP then pushes back on the
    broker) and resumes as acknowledgements come.

    Every method, and every callback given, runs on the event loop that created it. A lost
    connection is made again in the background (after 1, 2, 4, then every 8 seconds),
    with the same subscriptions.
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
        self._loop_thread = threading.get_ident()
        self._inbox = inbox
        self._on_connect_hook = on_connect
        self._on_published_hook = on_published
        self._subscriptions: dict[str, int] = {}
        self._session = 0
        self._unacknowledged = 0  # received with manual_ack, not yet acknowledged
        self._pubacks: list[int] = []  # message ids acknowledged in this turn of the loop
        self._max_unacknowledged = max_unacknowledged
        self._manual_ack = manual_ack
        self._budget = MESSAGES_PER_TURN  # messages the reader may still deliver this turn
        self._unconfirmed: set[int] = set()
        self._all_confirmed = asyncio.Event()
        self._all_confirmed.set()
        self._socket: Any = None  # the socket registered with the loop, if any
        self._reading = False  # its reader is registered
        self._lost = asyncio.Event()  # the socket was closed
        self._accepted = False  # the broker accepted the connection last opened
        self._opening: asyncio.Future[Any] | None = None  # the last connection attempt
        self._keeper: asyncio.Task[None] | None = None
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
        if url.username:
            self._client.username_pw_set(url.username, url.password)
        if url.tls:
            self._client.tls_set_context(ssl.create_default_context())
        self._client.on_connect = self._handle_connect
        self._client.on_disconnect = self._handle_disconnect
        self._client.on_message = self._handle_message
        self._client.on_publish = self._handle_publish
        self._client.on_socket_open = self._socket_opened
        self._client.on_socket_close = self._socket_closed
        self._client.on_socket_register_write = self._want_write
        self._client.on_socket_unregister_write = self._done_writing

    # --- the socket, registered with the loop ----------------------------------------

    def _on_loop(self, action: Callable[..., None], *args: Any) -> None:
        """Run ``action`` now if on the loop, else hand it to the loop (a socket callback
        from the thread that opens the connection)."""
        if threading.get_ident() == self._loop_thread:
            action(*args)
        else:
            self._loop.call_soon_threadsafe(action, *args)

    def _socket_opened(self, client: Any, userdata: Any, sock: Any) -> None:
        _no_delay(sock)
        reading = _Reader(sock, self._deliver, self._confirm)
        # paho has just set _sock and reads and writes through it from now on, this
        # callback's socket argument included when it closes.
        client._sock = reading
        self._on_loop(self._register, reading)

    def _register(self, sock: Any) -> None:
        self._socket = sock
        self._session += 1  # a new connection: message ids of earlier ones mean nothing
        self._unacknowledged = 0  # the broker re-sends what the last connection left
        self._pubacks = []  # acknowledgements of the last connection's messages
        self._lost.clear()
        self._resume_reading()

    def _socket_closed(self, client: Any, userdata: Any, sock: Any) -> None:
        self._on_loop(self._unregister, sock)

    def _unregister(self, sock: Any) -> None:
        if sock is not self._socket:
            return
        self._pause_reading()
        self._loop.remove_writer(sock)
        self._socket = None
        self._lost.set()

    def _want_write(self, client: Any, userdata: Any, sock: Any) -> None:
        self._on_loop(self._add_writer, sock)

    def _add_writer(self, sock: Any) -> None:
        if sock is self._socket:
            self._loop.add_writer(sock, self._write)

    def _write(self) -> None:
        """paho's ``loop_write``, the packets queued since the last one merged first."""
        merge_queued(self._client._out_packet)
        self._client.loop_write()

    def _done_writing(self, client: Any, userdata: Any, sock: Any) -> None:
        self._on_loop(self._remove_writer, sock)

    def _remove_writer(self, sock: Any) -> None:
        if sock is self._socket:
            self._loop.remove_writer(sock)

    def _pause_reading(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._socket)
            self._reading = False

    def _resume_reading(self) -> None:
        if not self._reading and self._socket is not None:
            self._loop.add_reader(self._socket, self._readable)
            self._reading = True
            self._read_pending()

    def _readable(self) -> None:
        """Read what has arrived: messages (up to MESSAGES_PER_TURN, see :class:`_Reader`)
        and paho's packets, one a ``loop_read`` call, until the socket is empty or reading
        is paused. The socket's readiness is level-triggered: what is left after a turn
        wakes us again, except for bytes already taken from the kernel, held by the
        reader or decrypted by TLS (:meth:`_read_pending`)."""
        if not self._reading:  # paused or closed since this was scheduled
            return
        read, reader = self._client.loop_read, self._socket
        self._budget = MESSAGES_PER_TURN
        received = reader.received
        try:
            for _ in range(READS_PER_TURN):
                if not self._reading or self._budget <= 0:  # paused or closed, or turn used up
                    break
                budget, handed = self._budget, reader.handed
                if read() != paho.MQTT_ERR_SUCCESS:
                    return
                if self._budget == budget and reader.handed == handed:
                    return  # no message, no packet for paho: the socket (TLS too) was empty
        finally:
            if reader.received != received:
                # paho's keep-alive counts only the bytes it reads itself (its time source).
                self._client._last_bytes_received = time.monotonic()
        self._read_pending()

    def _read_pending(self) -> None:
        """Read again soon if bytes are held above the kernel (:class:`_Reader`, TLS):
        the loop would never report the socket readable for them (paho's own loop checks
        a TLS socket's ``pending()`` the same way)."""
        if self._reading and self._socket.pending() > 0:
            self._loop.call_soon(self._readable)

    # --- paho's callbacks (on the loop) ----------------------------------------------

    def _handle_connect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if reason.is_failure:
            log.warning("broker %s refused the connection: %s", self._url, reason)
            return
        self._accepted = True
        for topic, qos in self._subscriptions.items():
            client.subscribe(topic, qos)
        self.connected.set()
        if self._on_connect_hook is not None:
            self._on_connect_hook()

    def _handle_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        self.connected.clear()

    def _deliver(self, message: Publish) -> bool:
        """A message the reader took (QoS 0 or 1): into the inbox, its PUBACK queued
        unless ``manual_ack``. False once no more should be taken in this turn."""
        self._received(message.topic, message.payload, message.mid, message.qos, message.retain)
        if message.qos == 1 and not self._manual_ack:
            self._puback_later(message.mid)
        self._budget -= 1
        return self._reading and self._budget > 0

    def _handle_message(self, client: Any, userdata: Any, message: paho.MQTTMessage) -> None:
        """A message paho handled: QoS 2 (:class:`_Reader` takes those of QoS 0 and 1)."""
        try:
            topic = message.topic
        except UnicodeDecodeError:  # brokers refuse these; never let it break the read
            topic = ""
        payload, retain = bytes(message.payload), bool(message.retain)
        self._received(topic, payload, message.mid, message.qos, retain)

    def _received(self, topic: str, payload: bytes, mid: int, qos: int, retain: bool) -> None:
        if self._inbox is None:
            return
        self._inbox.put_nowait(Incoming(topic, payload, mid, qos, retain, self._session))
        if self._max_unacknowledged is not None:
            # Flow control of our own: the broker's in-flight window should make this
            # rare, but Mosquitto 2.0 does not always keep to it.
            self._unacknowledged += 1
            if self._unacknowledged >= self._max_unacknowledged:
                self._pause_reading()

    def _confirm(self, mid: int) -> bool:
        """The broker's PUBACK for our QoS 1 publish ``mid``, taken out of the byte stream
        by the reader: done here as paho's own handling does it (the message forgotten,
        one fewer in flight, ``on_publish``) without paho's Python for it (reading the
        packet in three calls, decoding it into a reason code and properties: about half
        of the cost of a publish, docs/performance.md). Left to paho (False) while it keeps
        an in-flight limit, whose queue a PUBACK moves on, or for a message not of QoS 1.
        """
        client = self._client
        if client._max_inflight_messages:
            return False
        with client._out_message_mutex:
            message = client._out_messages.get(mid)
            if message is None:
                return True  # paho ignores a PUBACK it awaits no message for
            if message.qos != 1:
                return False
            del client._out_messages[mid]
            client._inflight_messages -= 1
        message.info._set_as_published()
        self._handle_publish(client, None, mid, None, None)
        return True

    def _handle_publish(
        self, client: Any, userdata: Any, mid: int, reason: Any, props: Any
    ) -> None:
        unconfirmed = self._unconfirmed
        unconfirmed.discard(mid)
        if not unconfirmed:
            self._all_confirmed.set()
        if self._on_published_hook is not None:
            self._on_published_hook(mid)

    # --- keeping the connection ------------------------------------------------------

    async def _keep_connected(self) -> None:
        """Open the connection, run the keep-alive while it lasts, open it again after a
        delay when it is lost or cannot be made, until :meth:`disconnect`."""
        failures = 0
        while True:
            if await self._open():
                await self._while_open()
                failures = 0 if self._accepted else failures
            delay = RECONNECT_DELAYS[min(failures, len(RECONNECT_DELAYS) - 1)]
            failures += 1
            await asyncio.sleep(delay)

    def _keeper_ended(self, keeper: asyncio.Task[None]) -> None:
        """Say so if the connection keeper failed: nothing would reconnect any more."""
        if not keeper.cancelled() and keeper.exception() is not None:
            log.error("MQTT %s: the connection keeper failed: %r", self._url, keeper.exception())

    async def _open(self) -> bool:
        """Open a connection (TCP, TLS, then CONNECT queued) on a worker thread: the only
        blocking step. False, logged, when it cannot be made."""
        self._accepted = False
        self._opening = asyncio.ensure_future(asyncio.to_thread(self._client.reconnect))
        try:
            # Shielded: cancelled by disconnect(), which then waits for the attempt.
            await asyncio.shield(self._opening)
        except (OSError, ValueError) as exc:
            log.warning("cannot connect to %s: %s", self._url, exc)
            return False
        return True

    async def _while_open(self) -> None:
        """Until the socket closes: paho's keep-alive every second (a PINGREQ when due; a
        connection silent for too long is closed)."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), MISC_INTERVAL)
            if self._lost.is_set():
                return
            self._client.loop_misc()

    # --- the interface ---------------------------------------------------------------

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
            self._client.connect_async(self._url.host, self._url.port, keepalive=KEEPALIVE)
        except (OSError, ValueError) as exc:
            raise BrokerError(f"cannot connect to {self._url}: {exc}") from None
        self._keeper = asyncio.create_task(self._keep_connected(), name=f"mqtt {self._url}")
        self._keeper.add_done_callback(self._keeper_ended)
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
        ``session``: a PUBACK for QoS 1 (sent with the others of this turn of the loop, see
        :meth:`_send_pubacks`), nothing to send for QoS 0 (it only frees its place under
        ``max_unacknowledged``).

        Only on the connection it arrived on: after a reconnect its message id may name
        another message, and the broker redelivers the unacknowledged one anyway.
        """
        if session != self._session:
            return
        if qos == 1:
            self._puback_later(mid)
        elif qos > 1:
            self._client.ack(mid, qos)
        if self._max_unacknowledged is not None:
            self._unacknowledged -= 1
            if self._unacknowledged < self._max_unacknowledged:
                self._resume_reading()

    def _puback_later(self, mid: int) -> None:
        if not self._pubacks:
            self._loop.call_soon(self._send_pubacks)
        self._pubacks.append(mid)

    def _send_pubacks(self) -> None:
        """The PUBACKs of this turn of the loop, queued with paho as one packet.

        paho writes each packet it queues with a ``send`` of its own and, Nagle being off,
        as a TCP segment of its own that the broker wakes up for: a thousand for a batch
        of a thousand reports. Queued together they go out in one (paho's private
        ``_packet_queue``, the queue its own ``ack`` uses; PUBACKs are four fixed bytes
        each and carry nothing paho tracks). A new connection drops those of the last one
        (:meth:`_register`): the broker redelivers those messages anyway.
        """
        mids, self._pubacks = self._pubacks, []
        if mids and self._socket is not None:
            pubacks = b"".join([_PUBACK.pack(paho.PUBACK, 2, mid) for mid in mids])
            self._client._packet_queue(paho.PUBACK, pubacks, 0, 0)

    async def disconnect(self, flush_timeout: float = 5.0) -> None:
        """Wait (up to ``flush_timeout``) for outstanding publishes, then DISCONNECT, after
        whatever was queued before it (acknowledgements included), and stop reconnecting.

        paho drops what it has not written yet when it disconnects, so without the wait
        QoS 1 messages published just before would be lost.
        """
        self._send_pubacks()  # before the DISCONNECT, not after
        if self.connected.is_set():
            await self.flush(flush_timeout)
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
        if self._opening is not None:  # an attempt in progress: its socket is closed below
            with contextlib.suppress(Exception):
                await self._opening
        sock = self._socket
        if sock is not None:
            self._client.disconnect()  # paho closes the socket once DISCONNECT is written
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), DISCONNECT_TIMEOUT)
            if self._socket is sock:  # the broker stopped reading: close it anyway
                self._unregister(sock)
                sock.close()
        self.connected.clear()
