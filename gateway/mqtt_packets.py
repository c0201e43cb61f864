"""MQTT 3.1.1 packets as they arrive from the broker: bytes in, whole packets out. Pure.

The gateway reads the messages it is sent without paho: paho spends about 40 µs of
Python on each received PUBLISH (it reads the packet in three calls, builds an
``MQTTMessage``, walks its topic matcher and takes three locks), where decoding one
from a buffer takes under 3 µs (docs/performance.md). :class:`PacketBuffer` splits the
stream into packets and decodes the PUBLISHes of QoS 0 and 1, the only ones a
subscription of QoS 1 brings; any other packet, and a PUBLISH that is not well formed,
comes out as its bytes, for paho to handle (or refuse) as it always did.
"""

from __future__ import annotations

from typing import NamedTuple

PUBLISH = 3  # packet type, the high nibble of the first byte
MAX_LENGTH_BYTES = 4  # the remaining length takes at most four bytes


class Publish(NamedTuple):
    """A PUBLISH packet of QoS 0 or 1, decoded. ``topic`` is "" when its bytes are not
    UTF-8 (a broker never forwards one; paho's ``MQTTMessage.topic`` raises for it)."""

    topic: str
    payload: bytes
    mid: int  # 0 for QoS 0
    qos: int
    retain: bool


def _header(data: bytes, at: int) -> tuple[int, int] | None:
    """Where the packet starting at ``data[at]`` ends and its body starts, or None
    while its fixed header has not fully arrived. A remaining length of more than
    four bytes gives an end of -1 (not MQTT: the connection is beyond repair)."""
    length, shift, index, end = 0, 0, at + 1, len(data)
    while index < end:
        byte = data[index]
        index += 1
        length |= (byte & 0x7F) << shift
        if byte < 0x80:
            return index + length, index
        shift += 7
        if shift == 7 * MAX_LENGTH_BYTES:
            return -1, index
    return None


def _publish(head: int, data: bytes, start: int, end: int) -> Publish | None:
    """The PUBLISH whose body is ``data[start:end]``, or None unless it is QoS 0 or 1 and
    well formed (its topic and message id fit in it)."""
    qos = (head >> 1) & 0x03
    if qos > 1 or end - start < 2:
        return None
    topic_end = start + 2 + (data[start] << 8 | data[start + 1])
    payload_start = topic_end + 2 if qos else topic_end
    if payload_start > end:
        return None
    try:
        topic = data[start + 2 : topic_end].decode()
    except UnicodeDecodeError:
        topic = ""
    mid = data[topic_end] << 8 | data[topic_end + 1] if qos else 0
    return Publish(topic, data[payload_start:end], mid, qos, bool(head & 0x01))


class PacketBuffer:
    """Bytes received, taken back as whole packets, in order.

    :meth:`feed` keeps what arrives without copying it; :meth:`next_packet` joins only
    when the next packet needs bytes from more than one piece, and not before that
    packet has fully arrived, so a packet of many megabytes is copied once, not once per
    piece.
    """

    __slots__ = ("_at", "_broken", "_data", "_queued", "_queued_bytes")

    def __init__(self) -> None:
        self._data = b""
        self._at = 0
        self._queued: list[bytes] = []
        self._queued_bytes = 0
        self._broken = False  # a length was not MQTT: no packet boundary can be trusted

    def __len__(self) -> int:
        """Bytes held: fed and not yet taken."""
        return len(self._data) - self._at + self._queued_bytes

    def feed(self, data: bytes) -> None:
        """Add bytes received, after those held."""
        if data:
            self._queued.append(data)
            self._queued_bytes += len(data)

    def next_packet(self) -> Publish | bytes | None:
        """Take the next packet: a QoS 0 or 1 PUBLISH decoded, any other packet as its
        bytes, or None while it has not fully arrived. From a malformed length on, every
        byte held comes out as it is (for paho to refuse; the connection is lost)."""
        if self._broken:
            return self._take_all() if len(self) else None
        data, at = self._data, self._at
        if at < len(data):
            bounds = _header(data, at)
            if bounds is not None and 0 <= bounds[0] <= len(data):
                end, start = bounds
                self._at = end
                if data[at] >> 4 == PUBLISH:
                    publish = _publish(data[at], data, start, end)
                    if publish is not None:
                        return publish
                return data[at:end]
            if bounds is not None and bounds[0] < 0:
                self._broken = True
                return self._take_all()
            missing = len(data) + 1 if bounds is None else bounds[0]
            if missing - len(data) > self._queued_bytes:
                return None  # not all here yet: join nothing meanwhile
        elif not self._queued:
            return None
        self._join()
        return self.next_packet()

    def _join(self) -> None:
        self._data = b"".join([self._data[self._at :], *self._queued])
        self._at = 0
        self._queued.clear()
        self._queued_bytes = 0

    def _take_all(self) -> bytes:
        self._join()
        data, self._data = self._data, b""
        return data
