"""Splitting the broker's byte stream into MQTT packets (gateway/mqtt_packets.py): every
packet comes out whole and in order however the stream is cut, QoS 0 and 1 PUBLISHes
decoded exactly as built, everything else as its bytes for paho."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from bench.raw_mqtt import mqtt_packet
from gateway.mqtt_packets import PacketBuffer, Publish


def publish_packet(
    topic: bytes, payload: bytes, mid: int, qos: int, retain: bool, dup: bool
) -> bytes:
    first = 0x30 | dup << 3 | qos << 1 | retain
    return mqtt_packet(
        first,
        len(topic).to_bytes(2, "big") + topic + mid.to_bytes(2, "big")[: 2 * (qos > 0)] + payload,
    )


def _decoded(topic: bytes) -> str:
    try:
        return topic.decode()
    except UnicodeDecodeError:
        return ""


@st.composite
def publishes(draw: st.DrawFn) -> tuple[bytes, Publish]:
    """A well-formed PUBLISH of QoS 0 or 1, and what it must decode to."""
    levels = st.lists(st.sampled_from(["tokens", "v1", "dev-1", "usage", "é", "日本", ""]))
    topic = draw(st.one_of(levels.map(lambda ls: "/".join(ls).encode()), st.binary(max_size=40)))
    payload = draw(st.one_of(st.binary(max_size=300), st.just(b"\xab" * 20_000)))
    qos, retain, dup = draw(st.integers(0, 1)), draw(st.booleans()), draw(st.booleans())
    mid = draw(st.integers(1, 0xFFFF)) if qos else 0
    expected = Publish(_decoded(topic), payload, mid, qos, retain)
    return publish_packet(topic, payload, mid, qos, retain, dup), expected


@st.composite
def others(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """Any other packet, for paho: another type, a QoS 2 PUBLISH, or a PUBLISH whose topic
    or message id does not fit in it."""
    kind = draw(st.sampled_from(["type", "qos2", "short", "no topic length"]))
    if kind == "type":
        first = draw(st.integers(1, 15).filter(lambda t: t != 3)) << 4 | draw(st.integers(0, 15))
        whole = mqtt_packet(first, draw(st.binary(max_size=200)))
    elif kind == "qos2":
        whole = publish_packet(b"t/2", draw(st.binary(max_size=50)), 7, 2, False, False)
    elif kind == "short":  # the topic's length, or with QoS 1 the message id, overruns
        rest, qos = draw(st.binary(max_size=20)), draw(st.integers(0, 1))
        claimed = max(0, len(rest) - 2 * qos + draw(st.integers(1, 3)))
        whole = mqtt_packet(0x30 | qos << 1, claimed.to_bytes(2, "big") + rest)
    else:
        whole = mqtt_packet(0x32, draw(st.binary(max_size=1)))
    return whole, whole


_ONE = publish_packet(b"a", b"x" * 200, 1, 1, False, False)


def take_all(buffer: PacketBuffer) -> list[Publish | bytes]:
    out: list[Publish | bytes] = []
    while (item := buffer.next_packet()) is not None:
        out.append(item)
    return out


@given(
    st.lists(st.one_of(publishes(), others()), max_size=30),
    st.lists(st.integers(0, 100_000), max_size=20),
)
@example(
    [(_ONE, Publish("a", b"x" * 200, 1, 1, False))] * 2,
    [1, 2, 4, 5, 6, 150, 205, 206],  # cuts in the header, the topic, the id, the payload
)
def test_every_packet_comes_out_whole_and_in_order_however_the_stream_is_cut(
    packets: list[tuple[bytes, Publish | bytes]], cuts: list[int]
) -> None:
    stream = b"".join(whole for whole, _ in packets)
    points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    buffer, out = PacketBuffer(), []
    for start, end in itertools.pairwise(points):
        buffer.feed(stream[start:end])
        out.extend(take_all(buffer))
        assert len(buffer) == end - sum(len(whole) for whole, _ in packets[: len(out)])
    assert out == [expected for _, expected in packets]
    assert len(buffer) == 0


def test_a_packet_that_has_not_fully_arrived_waits_and_is_joined_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    big = publish_packet(b"big", b"\x01" * 1_000_000, 9, 1, False, False)
    small = mqtt_packet(0xD0, b"")  # PINGRESP
    buffer, joins = PacketBuffer(), []
    join = PacketBuffer._join

    def counted(self: PacketBuffer) -> None:
        joins.append(len(self))
        join(self)

    monkeypatch.setattr(PacketBuffer, "_join", counted)
    stream = small + big + small
    for at in range(0, len(stream), 1000):
        buffer.feed(stream[at : at + 1000])
        if at == 0:
            assert buffer.next_packet() == small
        if at + 1000 < len(small + big):
            assert buffer.next_packet() is None
    assert buffer.next_packet() == Publish("big", b"\x01" * 1_000_000, 9, 1, False)
    assert buffer.next_packet() == small
    assert len(joins) <= 3  # not once per piece


def test_a_length_of_more_than_four_bytes_hands_over_everything_held() -> None:
    buffer = PacketBuffer()
    junk = b"\x30\xff\xff\xff\xff\x01" + b"rest"
    buffer.feed(mqtt_packet(0xD0, b"") + junk)
    assert buffer.next_packet() == b"\xd0\x00"
    assert buffer.next_packet() == junk  # for paho to refuse: it drops the connection
    assert buffer.next_packet() is None
    assert len(buffer) == 0
    # Past it no boundary can be trusted: what follows is handed over as it comes, never
    # read as packets (paho may still be waiting for the rest of that length).
    buffer.feed(_ONE)
    assert buffer.next_packet() == _ONE
    assert buffer.next_packet() is None


def test_a_length_cut_off_at_its_fourth_continuation_byte_is_malformed_at_once() -> None:
    buffer = PacketBuffer()
    buffer.feed(b"\x30\x80\x80\x80\x80")  # a fifth length byte can only be wrong
    assert buffer.next_packet() == b"\x30\x80\x80\x80\x80"
    buffer.feed(_ONE)
    assert buffer.next_packet() == _ONE  # as bytes, not decoded
