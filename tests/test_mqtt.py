"""The MQTT client (gateway/mqtt.py) against a real Mosquitto: paho driven by the event
loop, its flow control, reconnecting, and what it leaves behind when it stops."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import select
import socket
import ssl
from collections.abc import AsyncIterator
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bench.raw_mqtt import mqtt_packet
from gateway.errors import BrokerError
from gateway.mqtt import (
    MERGE_BYTES,
    MERGE_SCAN_BYTES,
    MESSAGES_PER_TURN,
    BrokerUrl,
    Incoming,
    MqttClient,
    _Reader,
    merge_queued,
)
from gateway.mqtt_packets import Publish
from tests.helpers import Listener, free_port, unique_prefix

TIMEOUT = 10.0
LOCALHOST = ip_address("127.0.0.1")


def _other_tasks() -> set[asyncio.Task[Any]]:
    return asyncio.all_tasks() - {asyncio.current_task()}  # type: ignore[operator]


async def test_reading_stops_at_the_unacknowledged_limit_and_resumes_with_acks(
    shared_broker: Any,
) -> None:
    limit, total = 5, 20
    topic = f"{unique_prefix()}/flow"
    inbox: asyncio.Queue[Incoming] = asyncio.Queue()
    client = MqttClient(
        BrokerUrl.parse(shared_broker.url), f"flow-{unique_prefix()}", manual_ack=True,
        inbox=inbox, max_unacknowledged=limit,
    )  # fmt: skip
    client.subscribe(topic)
    await client.connect()
    try:
        async with Listener.connect(shared_broker.url, topic) as publisher:
            for index in range(total):
                publisher.publish(topic, b"%d" % index)
            # The listener has them all: the broker has sent them to both subscribers.
            for index in range(total):
                await publisher.wait_for(lambda m, i=index: m.payload == b"%d" % i)
        held = [await asyncio.wait_for(inbox.get(), TIMEOUT) for _ in range(limit)]
        # More is waiting, read ahead or still in the kernel, and the loop turns, but
        # nothing more is handed over.
        sock = client._client.socket()
        if sock.pending() == 0:
            readable, _, _ = select.select([sock], [], [], TIMEOUT)
            assert readable == [sock]
        for _ in range(20):
            await asyncio.sleep(0)
        assert inbox.empty()

        received = list(held)
        for message in held:  # each acknowledgement lets one more in
            client.ack(message)
        while len(received) < total:
            message = await asyncio.wait_for(inbox.get(), TIMEOUT)
            assert inbox.qsize() < limit
            received.append(message)
            client.ack(message)
        assert [m.payload for m in received] == [b"%d" % i for i in range(total)]
    finally:
        await client.disconnect()


class _CountingSends:
    """Stands in for the socket under the client's read-ahead, counting ``send`` calls."""

    def __init__(self, sock: Any) -> None:
        self.sock, self.sends = sock, 0

    def send(self, data: bytes) -> int:
        self.sends += 1
        return int(self.sock.send(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


async def test_the_acknowledgements_of_one_turn_go_out_together_and_hold(
    shared_broker: Any,
) -> None:
    total, topic, client_id = 50, f"{unique_prefix()}/acks", f"acks-{unique_prefix()}"
    url = BrokerUrl.parse(shared_broker.url)
    inbox: asyncio.Queue[Incoming] = asyncio.Queue()
    client = MqttClient(url, client_id, persistent=True, manual_ack=True, inbox=inbox)
    client.subscribe(topic)
    await client.connect()
    async with Listener.connect(shared_broker.url, topic) as publisher:
        for index in range(total):
            publisher.publish(topic, b"%d" % index)
        received = [await asyncio.wait_for(inbox.get(), TIMEOUT) for _ in range(total)]
        counting = client._socket._sock = _CountingSends(client._socket._sock)
        for message in received:
            client.ack(message)
        await client.disconnect()  # the PUBACKs first, then DISCONNECT
        assert counting.sends == 2  # fifty PUBACKs in one write, and the DISCONNECT

        # The same session again: nothing is redelivered; the next message comes first.
        again: asyncio.Queue[Incoming] = asyncio.Queue()
        client = MqttClient(url, client_id, persistent=True, manual_ack=True, inbox=again)
        client.subscribe(topic)
        await client.connect()
        try:
            publisher.publish(topic, b"next")
            assert (await asyncio.wait_for(again.get(), TIMEOUT)).payload == b"next"
        finally:
            await client.disconnect()


async def test_an_unreachable_broker_is_a_broker_error_and_leaves_nothing_running() -> None:
    client = MqttClient(BrokerUrl.parse(f"mqtt://127.0.0.1:{free_port()}"), "nobody")
    with pytest.raises(BrokerError, match=r"unreachable after 0\.3 s"):
        await client.connect(timeout=0.3)
    assert not _other_tasks()
    assert client._client.socket() is None


async def test_after_a_broker_restart_it_reconnects_resubscribes_and_keeps_publishing(
    broker: Any,
) -> None:
    topic = f"{unique_prefix()}/again"
    inbox: asyncio.Queue[Incoming] = asyncio.Queue()
    connects: list[asyncio.Event] = [asyncio.Event(), asyncio.Event()]

    def connected() -> None:
        next(event for event in connects if not event.is_set()).set()

    client = MqttClient(
        BrokerUrl.parse(broker.url), f"again-{unique_prefix()}", inbox=inbox,
        on_connect=connected,
    )  # fmt: skip
    client.subscribe(topic)
    await client.connect()
    try:
        client.publish(topic, b"before")
        assert (await asyncio.wait_for(inbox.get(), TIMEOUT)).payload == b"before"
        broker.restart()
        await asyncio.wait_for(connects[1].wait(), TIMEOUT * 2)
        client.publish(topic, b"after")
        message = await asyncio.wait_for(inbox.get(), TIMEOUT)
        assert message.payload == b"after"
        assert message.session == 2  # the second connection
        assert await client.flush(TIMEOUT)
    finally:
        await client.disconnect()
    assert not client.connected.is_set()
    assert not _other_tasks()


async def test_disconnect_during_a_connection_attempt_closes_what_it_opened(
    shared_broker: Any,
) -> None:
    client = MqttClient(BrokerUrl.parse(shared_broker.url), f"quick-{unique_prefix()}")
    connecting = asyncio.create_task(client.connect())
    for _ in range(3):  # turns of the loop: connect() starts the attempt in the second
        await asyncio.sleep(0)
    assert client._opening is not None
    await client.disconnect()
    connecting.cancel()  # connected or not by now: either is fine
    await asyncio.gather(connecting, return_exceptions=True)
    assert client._client.socket() is None
    assert client._socket is None
    assert not _other_tasks()


# --- bytes held above the kernel: read ahead, or decrypted by TLS --------------------------
#
# This peer speaks just enough MQTT (the project's broker has no TLS listener): CONNACK,
# then one burst of many QoS 0 PUBLISH packets, more than the client reads in one turn of
# the loop, that the client takes from the kernel at once (its read-ahead; TLS decrypts
# the record whole too). What it has not handed to paho yet is then above the kernel:
# epoll never reports it.


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, as PEM files in ``directory``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _publish_qos0(topic: str, payload: bytes) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic.encode() + payload
    return mqtt_packet(0x30, body)


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "tcp"])
async def test_bytes_already_read_from_the_kernel_are_handled_without_a_new_wake_up(
    tls: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = _self_signed(tmp_path)
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    count = 3 * MESSAGES_PER_TURN
    burst = b"".join(_publish_qos0("tls/t", b"%d" % i) for i in range(count))
    assert len(burst) < 16_000  # one TLS record, one read ahead: taken all at once

    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(1)  # CONNECT
        length, shift = 0, 0
        while (byte := (await reader.readexactly(1))[0]) & 0x80:
            length, shift = length | (byte & 0x7F) << shift, shift + 7
        await reader.readexactly(length | byte << shift)
        writer.write(b"\x20\x02\x00\x00" + burst)  # CONNACK, accepted; then the burst
        await writer.drain()
        await reader.read()  # until the client disconnects
        writer.close()

    server = await asyncio.start_server(peer, "127.0.0.1", 0, ssl=server_tls if tls else None)
    port = server.sockets[0].getsockname()[1]
    client_tls = ssl.create_default_context(cafile=cert)  # trusts the peer's certificate
    monkeypatch.setattr(ssl, "create_default_context", lambda: client_tls)
    inbox: asyncio.Queue[Incoming] = asyncio.Queue()
    url = BrokerUrl.parse(f"{'mqtts' if tls else 'mqtt'}://127.0.0.1:{port}")
    client = MqttClient(url, "burst", inbox=inbox)
    try:
        await client.connect()
        payloads = [(await asyncio.wait_for(inbox.get(), TIMEOUT)).payload for _ in range(count)]
        assert payloads == [b"%d" % i for i in range(count)]
    finally:
        await client.disconnect()
        server.close()
        await server.wait_closed()


async def _read_packet(reader: asyncio.StreamReader) -> bytes:
    """One whole MQTT packet from the client, as a peer reads it."""
    head = await reader.readexactly(1)
    length, shift = 0, 0
    while (byte := (await reader.readexactly(1))[0]) & 0x80:
        length, shift = length | (byte & 0x7F) << shift, shift + 7
    return head + await reader.readexactly(length | byte << shift)


async def test_messages_behind_a_packet_paho_handles_silently_are_not_left_waiting() -> None:
    """A PINGRESP calls no callback: the messages read along with it must still be
    delivered in that turn, not when the next bytes happen to arrive."""
    messages = [_publish_qos0("t", b"%d" % i) for i in range(3)]

    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_packet(reader)  # CONNECT
        writer.write(b"\x20\x02\x00\x00")  # CONNACK, accepted
        await _read_packet(reader)  # SUBSCRIBE, sent once the client is connected
        writer.write(b"\xd0\x00" + b"".join(messages))  # PINGRESP first, in one write
        await reader.read()  # until the client disconnects
        writer.close()

    server = await asyncio.start_server(peer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    inbox: asyncio.Queue[Incoming] = asyncio.Queue()
    client = MqttClient(BrokerUrl.parse(f"mqtt://127.0.0.1:{port}"), "quiet", inbox=inbox)
    try:
        await client.connect()
        client.subscribe("t", qos=0)
        payloads = [(await asyncio.wait_for(inbox.get(), TIMEOUT)).payload for _ in messages]
        assert payloads == [b"0", b"1", b"2"]
    finally:
        await client.disconnect()
        server.close()
        await server.wait_closed()


# --- the reader itself -------------------------------------------------------------------


class _CountingSocket:
    """A socket that counts the ``recv`` system calls made on it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.calls = sock, 0

    def recv(self, size: int) -> bytes:
        self.calls += 1
        return self.sock.recv(size)

    def fileno(self) -> int:
        return self.sock.fileno()


def _paho_reads(reading: _Reader) -> bytes:
    """One packet read as paho reads it: its first byte, its length, then the rest."""
    head = reading.recv(1) + reading.recv(1)
    return head + reading.recv(head[1]) if head[1] else head


def test_the_reader_takes_messages_out_and_hands_paho_the_rest_whole() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        counting = _CountingSocket(ours)
        delivered: list[Publish] = []
        reading = _Reader(
            counting, lambda m: delivered.append(m) or len(delivered) != 30, lambda mid: False
        )
        messages = [_publish_qos0("t", b"%d" % i) for i in range(50)]
        suback, pingresp = b"\x90\x03\x00\x01\x01", b"\xd0\x00"
        theirs.sendall(b"".join([*messages[:20], suback, *messages[20:], pingresp]))
        select.select([ours], [], [], TIMEOUT)

        assert _paho_reads(reading) == suback  # the first twenty delivered on the way
        assert [m.payload for m in delivered] == [b"%d" % i for i in range(20)]
        with pytest.raises(BlockingIOError):  # the 30th said stop: the rest is held
            reading.recv(1)
        assert len(delivered) == 30
        assert reading.pending() == sum(map(len, messages[30:])) + len(pingresp)
        assert _paho_reads(reading) == pingresp  # taken up again on the next read
        assert [m.payload for m in delivered] == [b"%d" % i for i in range(50)]
        assert delivered[0] == Publish("t", b"0", 0, 0, False)
        assert counting.calls == 1
        assert reading.pending() == 0
        assert reading.fileno() == ours.fileno()  # everything else is the socket's
        with pytest.raises(BlockingIOError):  # nothing held, nothing in the kernel
            reading.recv(1)
        assert counting.calls == 2
        theirs.sendall(pingresp + pingresp[:1])
        theirs.shutdown(socket.SHUT_WR)
        select.select([ours], [], [], TIMEOUT)
        assert _paho_reads(reading) == pingresp
        assert reading.recv(1) == b""  # the end of the stream, as socket.recv says it


def test_the_reader_confirms_pubacks_it_may_and_hands_paho_those_it_may_not() -> None:
    """PUBACKs amid messages, in one read: those ``confirm`` takes (here, odd ids) never
    reach paho; the others do, whole and in order, between the messages around them."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        delivered: list[Publish] = []
        confirmed: list[int] = []

        def confirm(mid: int) -> bool:
            confirmed.append(mid)
            return mid % 2 == 1

        reading = _Reader(ours, lambda m: delivered.append(m) or True, confirm)
        puback = [b"\x40\x02" + mid.to_bytes(2, "big") for mid in range(1, 5)]
        message = _publish_qos0("t", b"m")
        theirs.sendall(b"".join([puback[0], message, puback[1], puback[2], message, puback[3]]))
        select.select([ours], [], [], TIMEOUT)
        assert _paho_reads(reading) == puback[1]  # mid 2: paho's
        assert (confirmed, len(delivered)) == ([1, 2], 1)
        assert _paho_reads(reading) == puback[3]  # mid 3 confirmed on the way, then 4
        assert (confirmed, len(delivered)) == ([1, 2, 3, 4], 2)
        with pytest.raises(BlockingIOError):
            reading.recv(1)


@contextlib.asynccontextmanager
async def _publishing(
    broker: Any, name: str, **options: Any
) -> AsyncIterator[tuple[MqttClient, list[int]]]:
    """A client connected to ``broker`` (more ``MqttClient`` options in ``options``),
    and the message ids it reports published, as they come."""
    published: list[int] = []
    client = MqttClient(
        BrokerUrl.parse(broker.url), f"{name}-{unique_prefix()}",
        on_published=published.append, **options,
    )  # fmt: skip
    await client.connect()
    try:
        yield client, published
    finally:
        await client.disconnect()


@pytest.mark.parametrize("max_inflight", [0, 7])
async def test_every_publish_is_confirmed_once_and_forgotten(
    shared_broker: Any, max_inflight: int
) -> None:
    """The broker's PUBACKs of our publications, taken by the reader (no in-flight
    limit) or left to paho (with one, whose queue they move on): each publish is reported
    once, and paho keeps none of them, so a reconnect would re-send nothing."""
    async with _publishing(shared_broker, "confirm", max_inflight=max_inflight) as publisher:
        client, published = publisher
        topic = f"{unique_prefix()}/confirm"
        mids = [client.publish(topic, i.to_bytes(2, "big")) for i in range(500)]
        assert await client.flush(TIMEOUT)
        assert sorted(published) == sorted(mids)
        assert client.unconfirmed == 0
        assert client._client._out_messages == {}
        assert client._client._inflight_messages == 0


async def test_a_puback_for_no_publication_of_ours_is_ignored(shared_broker: Any) -> None:
    async with _publishing(shared_broker, "stray") as (client, published):
        assert client._confirm(4242)  # taken care of: there is nothing to do
        assert published == []
        assert client._client._inflight_messages == 0


async def test_the_publications_of_one_turn_go_out_in_one_send_and_are_each_confirmed(
    shared_broker: Any,
) -> None:
    total, topic = 60, f"{unique_prefix()}/together"
    async with (
        _publishing(shared_broker, "together") as (client, published),
        Listener.connect(shared_broker.url, topic) as listener,
    ):
        counting = client._socket._sock = _CountingSends(client._socket._sock)
        mids = [client.publish(topic, b"%d" % i, retain=i % 2 == 0) for i in range(total)]
        assert await client.flush(TIMEOUT)
        assert counting.sends == 1  # sixty publications, one write (sixty without merging)
        assert sorted(published) == sorted(mids)
        last = await listener.wait_for(lambda m: m.payload == b"%d" % (total - 1))
        assert [m.payload for m in listener.messages] == [b"%d" % i for i in range(total)]
        assert last.topic == topic


def _queued(command: int, packet: bytes, qos: int = 1, pos: int = 0) -> dict[str, Any]:
    return {"command": command, "mid": 1, "qos": qos, "pos": pos,
            "to_process": len(packet) - pos, "packet": packet, "info": None}  # fmt: skip


def test_queued_packets_merge_in_order_except_those_paho_finishes_itself() -> None:
    """A QoS 0 PUBLISH (paho reports it written), a DISCONNECT (paho closes after it)
    and a packet partly written stay packets of their own; the runs between them become
    one packet each."""
    publish, puback = paho.PUBLISH | 0x02, paho.PUBACK
    partly = _queued(publish, b"xxP1", pos=2)
    qos0, disconnect = _queued(paho.PUBLISH, b"Q0", qos=0), _queued(paho.DISCONNECT, b"DC")
    out = collections.deque(
        [partly, _queued(puback, b"A1"), _queued(puback, b"A2"), qos0,
         _queued(publish, b"P2"), _queued(paho.PINGREQ, b"PR"), disconnect]
    )  # fmt: skip
    merge_queued(out)
    assert [p["packet"] for p in out] == [b"xxP1", b"A1A2", b"Q0", b"P2PR", b"DC"]
    assert out[0] is partly
    assert out[2] is qos0
    assert out[4] is disconnect
    assert [(p["pos"], p["to_process"]) for p in (out[1], out[3])] == [(0, 4), (0, 4)]
    for merged in (out[1], out[3]):  # nothing for paho to do once written
        assert merged["command"] & 0xF0 not in (paho.PUBLISH, paho.DISCONNECT)

    single = collections.deque([_queued(publish, b"P3")])
    merge_queued(single)
    assert [p["packet"] for p in single] == [b"P3"]
    assert single[0]["command"] == publish


def test_a_backlog_is_merged_in_bounded_packets_and_only_at_its_head() -> None:
    """A broker that reads slowly leaves a long queue: merged packets stay under
    MERGE_BYTES, only the first MERGE_SCAN_BYTES are looked at, and nothing is lost or
    reordered, however often the queue is merged again."""
    packets = [b"%06d" % i + b"x" * 994 for i in range(3 * MERGE_SCAN_BYTES // 1000)]
    out = collections.deque(_queued(paho.PUBLISH | 0x02, packet) for packet in packets)
    merge_queued(out)
    sizes = [len(p["packet"]) for p in out]
    assert max(sizes) <= MERGE_BYTES
    merged = [size for size in sizes if size > 1000]
    assert MERGE_SCAN_BYTES <= sum(merged) <= MERGE_SCAN_BYTES + MERGE_BYTES
    assert sizes[len(merged) :] == [1000] * (len(packets) - sum(merged) // 1000)  # untouched
    for _ in range(5):
        merge_queued(out)
    assert b"".join(p["packet"] for p in out) == b"".join(packets)
