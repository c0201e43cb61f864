"""The receiver process (gateway.receiver): its frames, the signatures it vouches for,
acknowledgement only when told, and a gateway that outlives its receiver."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

import gateway.receiver as receiver_module
from gateway.errors import BrokerError, LedgerError, Reason
from gateway.frames import frame, read_frame
from gateway.ingest import Registry, Rejected, verify, vouching_key
from gateway.metering import Device
from gateway.mqtt import Incoming
from gateway.receiver import Receiver
from gateway.sqlite_ledger import public_keys_in
from gateway.topics import Topics
from gateway.wire import UsageReport, public_key_hex
from tests.helpers import Listener, RawDevice, running_gateway, unique_prefix

TIMEOUT = 10.0


def stream(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


async def test_frames_round_trip_and_a_cut_frame_reads_as_the_end() -> None:
    values = [{"keys": {"d": b"\x00" * 32}}, ["ack", [[1, 7, 1]]], [["t", b"\xff", 3]]]
    reader = stream(b"".join(frame(v) for v in values))
    assert [await read_frame(reader) for _ in values] == values
    assert await read_frame(reader) is None
    assert await read_frame(stream(frame(["ack", []])[:-1])) is None


# --- what the receiver vouches for --------------------------------------------------------


def raw_public_key(device: RawDevice) -> bytes:
    return bytes.fromhex(public_key_hex(device.key))


def test_a_report_is_vouched_for_only_with_the_topic_device_s_own_key() -> None:
    alice, mallory = RawDevice("alice"), RawDevice("mallory")
    keys = {"alice": raw_public_key(alice), "mallory": raw_public_key(mallory)}
    report = alice.report({"api_calls": 1})
    assert vouching_key("alice", report, keys) == keys["alice"]
    assert vouching_key("mallory", report, keys) is None  # another device's topic
    assert vouching_key("bob", report, keys) is None  # no key: the gateway decides
    assert vouching_key(None, report, keys) is None
    forged = RawDevice("alice", key=Ed25519PrivateKey.generate()).report({"api_calls": 1})
    assert vouching_key("alice", forged, keys) is None
    assert vouching_key("alice", report[:-1], keys) is None


@given(st.binary(max_size=300), st.sampled_from(["alice", "", None]))
def test_nothing_is_vouched_for_junk_and_it_never_raises(payload: bytes, device: Any) -> None:
    assert vouching_key(device, payload, {"alice": b"\x01" * 32}) is None


def registry_with(*devices: tuple[RawDevice, bool]) -> Registry:
    registry = Registry()
    records = {
        d.id: Device(d.id, raw_public_key(d), d.id, d.id, 0, 0, 0, revoked=revoked)
        for d, revoked in devices
    }
    registry.apply(records)
    return registry


def test_a_vouched_report_is_verified_as_a_checked_one_but_for_the_signature() -> None:
    alice, revoked = RawDevice("alice"), RawDevice("gone")
    registry = registry_with((alice, False), (revoked, True))
    good, key = alice.report({"api_calls": 5}), raw_public_key(alice)
    assert verify("alice", good, registry, vouched_by=key) == verify("alice", good, registry)
    assert isinstance(verify("alice", good, registry, vouched_by=key), UsageReport)
    # What the gateway still decides itself: revocation, the body, the device in it.
    gone = verify("gone", revoked.report({"api_calls": 1}), registry, vouched_by=key)
    assert isinstance(gone, Rejected)
    assert gone.rejection.reason is Reason.REVOKED_DEVICE
    bob = RawDevice("bob", key=alice.key).report({})
    mismatch = verify("alice", bob, registry, vouched_by=key)
    assert isinstance(mismatch, Rejected)
    assert mismatch.rejection.reason is Reason.DEVICE_MISMATCH


def test_a_report_vouched_for_with_another_device_s_key_is_checked_in_full() -> None:
    """The receiver's key table may confuse two ids whose hashes collide: a report signed
    by another device's key, vouched for with that key, is still refused."""
    alice, mallory = RawDevice("alice"), RawDevice("mallory")
    registry = registry_with((alice, False), (mallory, False))
    impostor = RawDevice("alice", key=mallory.key).report({"api_calls": 1})
    result = verify("alice", impostor, registry, vouched_by=raw_public_key(mallory))
    assert isinstance(result, Rejected)
    assert result.rejection.reason is Reason.BAD_SIGNATURE


# --- the process, against a real broker -------------------------------------------------


@asynccontextmanager
async def receiving(
    broker_url: str, client_id: str, prefix: str, keys: dict[str, bytes]
) -> AsyncIterator[tuple[Receiver, asyncio.Queue[Incoming]]]:
    inbox: asyncio.Queue[Incoming] = asyncio.Queue()
    receiver = Receiver(broker_url, client_id, prefix, inbox, keys.items, max_unacknowledged=50)
    await receiver.start()
    running = asyncio.create_task(receiver.run())
    try:
        yield receiver, inbox
    finally:
        await receiver.close()
        await asyncio.wait_for(running, TIMEOUT)


def keyless_receiver(broker_url: str) -> Receiver:
    """A receiver of a fresh client id and prefix, with no device keys."""
    inbox: asyncio.Queue[Incoming] = asyncio.Queue()
    client_id = f"rx-{uuid.uuid4().hex[:8]}"
    return Receiver(broker_url, client_id, unique_prefix(), inbox, tuple, max_unacknowledged=50)


async def next_message(inbox: asyncio.Queue[Incoming]) -> Incoming:
    return await asyncio.wait_for(inbox.get(), TIMEOUT)


async def test_the_receiver_vouches_and_the_broker_keeps_what_it_was_not_told_to_ack(
    shared_broker: Any,
) -> None:
    prefix, client_id = unique_prefix(), f"rx-{uuid.uuid4().hex[:8]}"
    topics, alice, stranger = Topics(prefix), RawDevice("alice"), RawDevice("stranger")
    keys = {"alice": raw_public_key(alice)}
    async with receiving(shared_broker.url, client_id, prefix, keys):
        pass  # the persistent session exists from now on
    first, second = alice.report({"api_calls": 1}), stranger.report({"api_calls": 1})
    async with Listener.connect(shared_broker.url) as publisher:
        publisher.publish(topics.usage("alice"), first)
        publisher.publish(topics.usage("stranger"), second)
        assert await publisher.client.flush(TIMEOUT)
        async with receiving(shared_broker.url, client_id, prefix, keys) as (receiver, inbox):
            got = [await next_message(inbox), await next_message(inbox)]
            vouched = [(m.payload, m.vouched_by) for m in got]
            assert vouched == [(first, keys["alice"]), (second, None)]
            receiver.ack(got[0])  # the second is never acknowledged
        marker = alice.report({"api_calls": 2})
        publisher.publish(topics.usage("alice"), marker)
        assert await publisher.client.flush(TIMEOUT)
        async with receiving(shared_broker.url, client_id, prefix, keys) as (_, inbox):
            # Redelivered first (same session), then the marker; never the acknowledged one.
            assert (await next_message(inbox)).payload == second
            assert (await next_message(inbox)).payload == marker


async def test_a_receiver_whose_gateway_died_exits(shared_broker: Any) -> None:
    receiver = keyless_receiver(shared_broker.url)
    await receiver.start()
    process = receiver._process
    assert process is not None
    assert receiver._writer is not None
    receiver._writer.transport.abort()  # what the kernel does when the gateway is killed
    assert await asyncio.wait_for(process.wait(), TIMEOUT) == 0


async def test_a_receiver_that_cannot_connect_says_why() -> None:
    inbox: asyncio.Queue[Incoming] = asyncio.Queue()
    receiver = Receiver("mqtt://127.0.0.1:1", "rx-none", "p", inbox, tuple, max_unacknowledged=5)
    with pytest.raises(BrokerError, match=r"unreachable after 0\.5 s"):
        await receiver.start(timeout=0.5)


async def test_the_gateway_replaces_a_killed_receiver_and_charges_exactly_once(
    shared_broker: Any, tmp_path: Path
) -> None:
    device = RawDevice("phoenix")
    async with running_gateway(shared_broker.url, tmp_path) as gw:
        await gw.add_device(device.id, device.key, 1_000)  # after start: sent to the receiver
        registry, metrics = gw.service.registry, gw.service.metrics.registry
        async with Listener.connect(shared_broker.url) as publisher:
            publisher.publish(gw.topics.usage(device.id), device.report({"api_calls": 100}))
            await gw.wait_committed(lambda: registry.devices[device.id].used == 1)
            assert metrics.get_sample_value("tokenwell_vouched_reports_total") == 1
            receiver = gw.gateway.receiver
            first = receiver.pid
            os.kill(first, signal.SIGKILL)
            publisher.publish(gw.topics.usage(device.id), device.report({"api_calls": 300}))
            publisher.publish(gw.topics.usage(device.id), device.report({"api_calls": 300}))
            await gw.wait_committed(lambda: registry.devices[device.id].used == 3, timeout=30)
        assert receiver.pid != first
        assert metrics.get_sample_value("tokenwell_receiver_restarts_total") == 1
        assert (await gw.device(device.id))["balance"] == 997


async def test_with_a_sqlite_ledger_the_receiver_reads_the_keys_itself_and_again_when_replaced(
    shared_broker: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Provisioned before the start, a device's key comes to the receiver from the ledger
    file, not over the socket (nothing is sent: the gateway's key source is never read);
    one provisioned later is sent; a replacement receiver reads both from the file."""
    early, late = RawDevice("early"), RawDevice("late")
    async with running_gateway(shared_broker.url, tmp_path) as gw:
        await gw.add_device(early.id, early.key, 1_000)
    sent: list[str] = []
    monkeypatch.setattr(Receiver, "_send_keys", lambda *_: sent.append("keys"))
    async with running_gateway(shared_broker.url, tmp_path, prefix=gw.topics.prefix) as gw:
        await gw.add_device(late.id, late.key, 1_000)
        registry, metrics = gw.service.registry, gw.service.metrics.registry
        vouched = lambda: metrics.get_sample_value("tokenwell_vouched_reports_total")  # noqa: E731
        async with Listener.connect(shared_broker.url) as publisher:
            for device, calls in ((early, 100), (late, 100)):
                publisher.publish(gw.topics.usage(device.id), device.report({"api_calls": calls}))
            await gw.wait_committed(lambda: registry.devices[late.id].used == 1)
            await gw.wait_committed(lambda: registry.devices[early.id].used == 1)
            assert vouched() == 2
            os.kill(gw.gateway.receiver.pid, signal.SIGKILL)
            for device in (early, late):
                publisher.publish(gw.topics.usage(device.id), device.report({"api_calls": 300}))
            await gw.wait_committed(lambda: registry.devices[late.id].used == 3, timeout=30)
            await gw.wait_committed(lambda: registry.devices[early.id].used == 3, timeout=30)
        assert metrics.get_sample_value("tokenwell_receiver_restarts_total") == 1
        # The replacement vouched for both new reports: it had both keys. (A first report
        # whose PUBACK the killed receiver had not sent yet comes again, is vouched for
        # again, and charges nothing: a duplicate.)
        again = metrics.get_sample_value("tokenwell_reports_total", {"outcome": "duplicate"})
        assert vouched() == 4 + (again or 0)
    assert sent == []


def test_the_keys_come_from_the_ledger_file_and_an_unreadable_one_leaves_none(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "ledger.sqlite3"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE devices (id TEXT PRIMARY KEY, public_key BLOB NOT NULL)")
        rows = [("a", b"\x01" * 32), ("b", b"\x02" * 32)]
        conn.executemany("INSERT INTO devices VALUES (?, ?)", rows)
    assert sorted(public_keys_in(db)) == rows
    table = receiver_module._stored_keys(str(db))
    assert (len(table), table.get("a"), table.get("b")) == (2, b"\x01" * 32, b"\x02" * 32)
    with pytest.raises(LedgerError):
        list(public_keys_in(tmp_path / "missing.sqlite3"))
    assert len(receiver_module._stored_keys(str(tmp_path / "missing.sqlite3"))) == 0
    assert "the gateway verifies their reports" in caplog.text
    assert len(receiver_module._stored_keys(None)) == 0


async def test_a_qos_0_report_is_charged_like_any_other(shared_broker: Any, tmp_path: Path) -> None:
    """QoS 0 needs no PUBACK: the receiver sends none (a PUBACK for id 0 would be a
    protocol error), yet the report is charged, and QoS 1 reports after it still are."""
    device = RawDevice("quiet")
    async with running_gateway(shared_broker.url, tmp_path) as gw:
        await gw.add_device(device.id, device.key, 1_000)
        registry = gw.service.registry
        async with Listener.connect(shared_broker.url) as publisher:
            topic = gw.topics.usage(device.id)
            publisher.client.publish(topic, device.report({"api_calls": 100}), qos=0)
            await gw.wait_committed(lambda: registry.devices[device.id].used == 1)
            publisher.publish(topic, device.report({"api_calls": 200}))
            await gw.wait_committed(lambda: registry.devices[device.id].used == 2)


async def test_a_receiver_whose_forwarding_fails_exits_to_be_replaced(
    shared_broker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A receiver that could no longer forward would stall the gateway while it looked
    alive: it exits instead (status 1), and the gateway starts another."""

    def broken(*_: object) -> bytes:
        raise RuntimeError("injected")

    monkeypatch.setattr(receiver_module, "vouching_key", broken)
    prefix, device = unique_prefix(), RawDevice("alice")
    gateway_end, receiver_end = socket.socketpair()
    serving = asyncio.create_task(receiver_module.serve(receiver_end.detach()))
    reader, writer = await asyncio.open_connection(sock=gateway_end)
    writer.write(frame({
        "broker": shared_broker.url, "client_id": f"rx-{uuid.uuid4().hex[:8]}",
        "topic_prefix": prefix, "max_unacknowledged": 10, "log_level": 30, "keys_db": None,
    }))  # fmt: skip
    writer.write(frame(["keys", [["alice", raw_public_key(device)]]]) + frame(["connect", TIMEOUT]))
    assert await asyncio.wait_for(read_frame(reader), TIMEOUT) == ["ready"]
    async with Listener.connect(shared_broker.url) as publisher:
        publisher.publish(Topics(prefix).usage("alice"), device.report({"api_calls": 1}))
        assert await asyncio.wait_for(serving, TIMEOUT) == 1
    writer.close()


async def test_a_receiver_outlives_ctrl_c_and_sigterm_until_its_gateway_closes(
    shared_broker: Any,
) -> None:
    """Ctrl-C and a service manager's SIGTERM reach the whole process group: the
    receiver stays (to send the gateway's last acknowledgements) and exits cleanly when
    the gateway closes it."""
    prefix, device = unique_prefix(), RawDevice("alice")
    keys = {"alice": raw_public_key(device)}
    async with receiving(shared_broker.url, f"rx-{uuid.uuid4().hex[:8]}", prefix, keys) as (
        receiver,
        inbox,
    ):
        process = receiver._process
        assert process is not None
        os.kill(process.pid, signal.SIGINT)
        os.kill(process.pid, signal.SIGTERM)
        async with Listener.connect(shared_broker.url) as publisher:
            report = device.report({"api_calls": 1})
            publisher.publish(Topics(prefix).usage("alice"), report)
            assert (await next_message(inbox)).payload == report  # still forwarding
    assert process.returncode == 0


async def test_close_during_a_restart_ends_everything(
    shared_broker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() while a dead receiver's replacement is being spawned: the replacement is
    ended, run() returns, no process is left."""
    receiver = keyless_receiver(shared_broker.url)
    await receiver.start()
    running = asyncio.create_task(receiver.run())
    spawning, proceed, spawned = asyncio.Event(), asyncio.Event(), []
    original = Receiver.spawn

    async def held_spawn(self: Receiver) -> None:
        spawning.set()
        await proceed.wait()
        await original(self)
        spawned.append(self._process)

    monkeypatch.setattr(Receiver, "spawn", held_spawn)
    first = receiver._process
    assert first is not None
    first.kill()
    await asyncio.wait_for(spawning.wait(), TIMEOUT)
    await receiver.close()
    proceed.set()
    await asyncio.wait_for(running, TIMEOUT)
    assert [p.returncode is not None for p in spawned] == [True]
