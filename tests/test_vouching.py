"""The receiver's vouching (gateway/receiver.py, ``Vouching``): a batch checked on the
loop or on threads gives, in order, exactly what :func:`vouching_key` gives message by
message: the device's key for a good signature, None for anything it cannot vouch for.
And its forwarding: every message once, in order, the next batch vouched for while one
is sent."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import msgpack
import pytest

from gateway.ingest import vouching_key
from gateway.keytable import KeyTable
from gateway.mqtt import Incoming
from gateway.receiver import INLINE_VOUCH, MAX_FORWARDED, VOUCH_AHEAD, Vouching, _forward
from gateway.topics import Topics
from tests.helpers import RawDevice

TOPICS = Topics("t")


def _batch(size: int) -> tuple[list[Incoming], KeyTable]:
    """``size`` messages of six devices: good reports, a forged one, an unknown device's,
    bytes that are no envelope, a report on another device's topic."""
    devices = [RawDevice(f"dev-{i}") for i in range(6)]
    keys = KeyTable((d.id, d.key.public_key().public_bytes_raw()) for d in devices[:5])
    messages = []
    for index in range(size):
        device = devices[index % len(devices)]
        topic, payload = TOPICS.usage(device.id), device.report({"api_calls": index})
        if index % 7 == 3:  # forged: the signature of another report
            payload = payload[:-64] + devices[0].report({"api_calls": 1})[-64:]
        elif index % 11 == 5:
            payload = b"\x93not an envelope"
        elif index % 13 == 6:  # signed by one device, sent on another's topic
            topic = TOPICS.usage(devices[(index % len(devices) + 1) % 5].id)
        messages.append(Incoming(topic, payload, index + 1, 1, False, 1, None))
    return messages, keys


@pytest.mark.parametrize("size", [1, INLINE_VOUCH, INLINE_VOUCH + 1, 300])
async def test_a_batch_is_vouched_for_in_order_as_message_by_message(size: int) -> None:
    messages, keys = _batch(size)
    vouching = Vouching(TOPICS, keys)
    threads: set[int] = set()
    check = vouching._check

    def recording(chunk: Sequence[Incoming]) -> list[bytes | None]:
        threads.add(threading.get_ident())
        return check(chunk)

    vouching._check = recording  # type: ignore[method-assign]
    expected = [vouching_key(TOPICS.device_of_usage(m.topic), m.payload, keys) for m in messages]
    try:
        assert await vouching.check(messages) == expected
    finally:
        vouching._workers.close()
    assert None in expected or size < 4  # the batch holds what cannot be vouched for
    assert any(key is not None for key in expected)
    on_the_loop = threads == {threading.get_ident()}
    assert on_the_loop == (size <= INLINE_VOUCH)  # larger batches go to the threads


class FrameSink:
    """A stand-in for the receiver's socket to the gateway: keeps the frames written (a
    4-byte length, then msgpack: gateway.frames), sets ``done`` once ``expected``
    messages have been sent."""

    def __init__(self, expected: int, log: list[tuple[str, int]]) -> None:
        self.frames: list[list[list[object]]] = []
        self.expected, self.log = expected, log
        self.done = asyncio.Event()

    def write(self, data: bytes) -> None:
        self.frames.append(msgpack.unpackb(data[4:]))
        self.log.append(("sent", len(self.frames[-1])))
        if sum(map(len, self.frames)) >= self.expected:
            self.done.set()

    async def drain(self) -> None:
        pass


async def test_forwarding_sends_every_message_once_in_order_vouching_one_batch_ahead() -> None:
    size = 2 * MAX_FORWARDED + 500
    messages, keys = _batch(size)
    vouching, log = Vouching(TOPICS, keys), []
    start = vouching.start

    def recording(batch: list[Incoming]) -> asyncio.Future[list[bytes | None]]:
        log.append(("started", len(batch)))
        return start(batch)

    vouching.start = recording  # type: ignore[method-assign]
    inbox: asyncio.Queue[Incoming] = asyncio.Queue()
    for message in messages:
        inbox.put_nowait(message)
    sink = FrameSink(size, log)
    forwarding = asyncio.create_task(_forward(inbox, sink, vouching))  # type: ignore[arg-type]
    try:
        await asyncio.wait_for(sink.done.wait(), 30)
    finally:
        forwarding.cancel()
        vouching._workers.close()
    rows = [row for rows in sink.frames for row in rows]
    expected = [vouching_key(TOPICS.device_of_usage(m.topic), m.payload, keys) for m in messages]
    assert [row[2] for row in rows] == [m.mid for m in messages]  # each once, in order
    assert [row[6] for row in rows] == expected
    assert VOUCH_AHEAD == 2
    assert log == [
        ("started", MAX_FORWARDED), ("started", MAX_FORWARDED),  # the next one at once
        ("sent", MAX_FORWARDED), ("started", 500),
        ("sent", MAX_FORWARDED), ("sent", 500),
    ]  # fmt: skip
