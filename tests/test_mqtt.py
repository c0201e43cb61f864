"""The MQTT client (gateway/mqtt.py) against a real Mosquitto: paho driven by the event
loop, its flow control, reconnecting, and what it leaves behind when it stops."""

from __future__ import annotations

import asyncio
import select
from typing import Any

import pytest

from gateway.errors import BrokerError
from gateway.mqtt import BrokerUrl, Incoming, MqttClient
from tests.helpers import Listener, free_port, unique_prefix

TIMEOUT = 10.0


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
        # More is waiting on the socket, and the loop turns, but nothing more is read.
        sock = client._client.socket()
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
