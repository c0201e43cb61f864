"""The benchmark's lean MQTT client (``bench/raw_mqtt.py``) against a real Mosquitto:
what it publishes arrives whole and in order, every PUBACK is counted, the stamps say
when each message went out, and its subscriber acknowledges what it receives."""

from __future__ import annotations

import pytest

from bench import raw_mqtt
from bench.mqtt import Recorder, publish_paced, recording
from broker import RunningBroker
from gateway.mqtt_packets import PacketBuffer, Publish


def test_packets_are_what_the_gateways_decoder_reads() -> None:
    buffer = PacketBuffer()
    payload = bytes(range(256)) * 3  # a remaining length of two bytes
    buffer.feed(raw_mqtt.publish_packet("t/ü", payload, 65_535) + raw_mqtt.puback_packet(7))
    assert buffer.next_packet() == Publish("t/ü", payload, 65_535, 1, False)
    assert buffer.next_packet() == b"\x40\x02\x00\x07"
    assert buffer.next_packet() is None


def test_message_ids_stay_within_sixteen_bits_and_skip_zero() -> None:
    ids = [raw_mqtt.message_id(i) for i in (0, 1, 65_534, 65_535, 65_536, 200_000)]
    assert ids == [1, 2, 65_535, 1, 2, 200_000 % 65_535 + 1]


def test_a_paced_load_arrives_whole_in_order_and_acknowledged(
    shared_broker: RunningBroker,
) -> None:
    """Past the 16-bit message ids, and past the window of unacknowledged publishes."""
    messages = [(f"bench/raw/{i % 7}", i.to_bytes(4, "big")) for i in range(70_000)]
    with recording(shared_broker.url, ["bench/raw/#"]) as recorder:
        stamps = publish_paced(shared_broker.url, messages, rate=1_000_000, timeout=60)
        recorder.wait_for(lambda got: len(got) >= len(messages), 60, "the load")
    assert [(a.topic, a.payload) for a in recorder.arrivals] == messages
    assert stamps == sorted(stamps)
    assert len(stamps) == len(messages)
    published = dict(zip((p for _, p in messages), stamps, strict=True))
    assert all(a.at >= published[a.payload] for a in recorder.arrivals)


def test_the_subscriber_acknowledges_so_the_broker_keeps_sending(
    shared_broker: RunningBroker,
) -> None:
    """Mosquitto stops sending QoS 1 messages to a client that leaves its window of
    unacknowledged ones full (``max_inflight_messages``, 5,000 here): all 12,000 arrive
    only if the subscriber acknowledges each."""
    messages = [("bench/acks/x", i.to_bytes(4, "big")) for i in range(12_000)]
    with recording(shared_broker.url, ["bench/acks/#"], keep=False) as recorder:
        publish_paced(shared_broker.url, messages, rate=1_000_000, timeout=60)
        recorder.wait_for(lambda got: len(got) >= len(messages), 60, "every message")
    assert len(recorder.arrivals) == len(messages)


def test_a_refused_or_missing_broker_is_an_error_not_a_hang() -> None:
    with pytest.raises(ConnectionRefusedError):
        raw_mqtt.Connection("mqtt://127.0.0.1:1", timeout=2)


def test_the_recorder_stamps_each_message_as_handed_over() -> None:
    recorder = Recorder()
    recorder.record("a", b"1", 10.0)
    recorder.record("b", b"2", 11.0)
    recorder.wait_for(lambda got: len(got) == 2, 1, "two")
    got = [(a.at, a.topic, a.payload) for a in recorder.arrivals]
    assert got == [(10.0, "a", b"1"), (11.0, "b", b"2")]
