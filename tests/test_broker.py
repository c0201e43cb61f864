"""The launcher's broker, over real sockets with paho-mqtt (MQTT 3.1.1): QoS 1 delivery,
persistent sessions and retained messages across a clean restart, and a deep offline queue.
"""

from __future__ import annotations

import queue
import socket
import threading
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from broker import BrokerStartError, RunningBroker, start_broker

TIMEOUT = 10.0  # seconds to wait for any one event; tests pass in far less


class Client:
    """A connected paho client whose received messages land in `messages`."""

    def __init__(self, broker: RunningBroker, client_id: str = "", clean: bool = True) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.session_present = False
        self._connected = threading.Event()
        self._subacks: queue.Queue[int] = queue.Queue()
        self._paho = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean,
            protocol=mqtt.MQTTv311,
        )
        self._paho.on_connect = self._on_connect
        self._paho.on_subscribe = lambda _c, _u, mid, _rc, _p: self._subacks.put(mid)
        self._paho.on_message = lambda _c, _u, message: self.messages.put(message)
        self._paho.connect(broker.host, broker.port)
        self._paho.loop_start()
        assert self._connected.wait(TIMEOUT), "no CONNACK"

    def _on_connect(self, _c: Any, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        assert not reason.is_failure, reason
        self.session_present = flags.session_present
        self._connected.set()

    def subscribe(self, topic: str) -> None:
        _, mid = self._paho.subscribe(topic, qos=1)
        assert self._subacks.get(timeout=TIMEOUT) == mid

    def publish(self, topic: str, *payloads: bytes, retain: bool = False) -> None:
        """Publish each payload at QoS 1 and return once the broker acknowledged all."""
        infos = [self._paho.publish(topic, p, qos=1, retain=retain) for p in payloads]
        for info in infos:
            info.wait_for_publish(TIMEOUT)
            assert info.is_published()

    def receive(self, count: int) -> list[mqtt.MQTTMessage]:
        """The next `count` messages, failing the test if they are not all in by TIMEOUT."""
        received: list[mqtt.MQTTMessage] = []
        try:
            while len(received) < count:
                received.append(self.messages.get(timeout=TIMEOUT))
        except queue.Empty:
            pytest.fail(f"received {len(received)} of {count} messages")
        return received

    def close(self) -> None:
        self._paho.disconnect()
        self._paho.loop_stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()


def unique(name: str) -> str:
    return f"test/{name}/{uuid.uuid4().hex[:12]}"


def test_qos1_message_round_trip(shared_broker: RunningBroker) -> None:
    """A QoS 1 publish reaches a subscriber with its payload and QoS intact."""
    topic = unique("round_trip")
    with Client(shared_broker) as subscriber, Client(shared_broker) as publisher:
        subscriber.subscribe(topic)
        publisher.publish(topic, b"\x00report\xff")
        [message] = subscriber.receive(1)
    assert (message.topic, message.payload, message.qos) == (topic, b"\x00report\xff", 1)
    assert shared_broker.url == f"mqtt://{shared_broker.host}:{shared_broker.port}"


def test_persistent_session_gets_messages_queued_across_a_clean_restart(
    broker: RunningBroker,
) -> None:
    """Reports published while the gateway is away are delivered after a broker restart."""
    topic, gateway_id = unique("persistent"), f"gw-{uuid.uuid4().hex[:8]}"
    with Client(broker, gateway_id, clean=False) as gateway:
        gateway.subscribe(topic)
    with Client(broker) as device:
        device.publish(topic, b"1", b"2", b"3")
    port = broker.port
    broker.restart()
    assert broker.port == port
    with Client(broker, gateway_id, clean=False) as gateway:
        assert gateway.session_present
        payloads = sorted(m.payload for m in gateway.receive(3))
    assert payloads == [b"1", b"2", b"3"]


def test_more_than_1000_messages_queue_for_an_offline_client(broker: RunningBroker) -> None:
    """max_queued_messages is raised: Mosquitto's default 1000 would drop the rest silently."""
    topic, count = unique("deep_queue"), 1500
    with Client(broker, "gw-deep", clean=False) as gateway:
        gateway.subscribe(topic)
    expected = [b"%05d" % i for i in range(count)]
    with Client(broker) as device:
        device.publish(topic, *expected)
    with Client(broker, "gw-deep", clean=False) as gateway:
        received = sorted(m.payload for m in gateway.receive(count))
        assert gateway.messages.empty()
    assert received == expected


def test_retained_message_survives_a_clean_restart(broker: RunningBroker) -> None:
    """A retained control message is still there for a device connecting after a restart."""
    topic = unique("retained")
    with Client(broker) as gateway:
        gateway.publish(topic, b"state", retain=True)
    broker.restart()
    with Client(broker) as device:
        device.subscribe(topic)
        [message] = device.receive(1)
    assert (message.payload, message.retain) == (b"state", True)


def test_start_after_kill_serves_again_on_the_same_port(broker: RunningBroker) -> None:
    """kill() is a crash; start() brings the broker back at the same URL."""
    url = broker.url
    broker.kill()
    assert not broker.running
    broker.start()
    assert broker.running
    assert broker.url == url
    with Client(broker) as client:
        client.publish(unique("after_kill"), b"ok")


def test_busy_port_raises_broker_start_error(tmp_path: Path) -> None:
    """A broker that cannot listen fails start_broker with BrokerStartError, not a hang."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(BrokerStartError):
            start_broker(tmp_path, port=taken.getsockname()[1])
