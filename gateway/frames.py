"""Length-prefixed msgpack frames: how the gateway talks to its child processes (the
receiver, gateway.receiver; the ledger's writer, gateway.writer) over a socket pair.

A frame is a 4-byte big-endian length, then a msgpack value (``bin`` for bytes, ``str``
for text). This module imports nothing heavier than msgpack, so a child that needs only
frames starts quickly.
"""

from __future__ import annotations

import asyncio
import struct
from typing import IO, Any

import msgpack

FRAME = struct.Struct(">I")


def frame(value: object) -> bytes:
    """``value`` as one frame: its length, then its msgpack encoding."""
    body: bytes = msgpack.packb(value, use_bin_type=True)
    return FRAME.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader) -> Any:
    """The next frame's value; None at the end of the stream (also when it ends inside a
    frame: the other side died while writing)."""
    try:
        head = await reader.readexactly(FRAME.size)
        body = await reader.readexactly(FRAME.unpack(head)[0])
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    return msgpack.unpackb(body, raw=False)


def read_frame_blocking(stream: IO[bytes]) -> Any:
    """:func:`read_frame` from a blocking binary stream (``socket.makefile("rb")``)."""
    head = stream.read(FRAME.size)
    if len(head) < FRAME.size:
        return None
    size = FRAME.unpack(head)[0]
    body = stream.read(size)
    if len(body) < size:
        return None
    return msgpack.unpackb(body, raw=False)
