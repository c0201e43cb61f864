"""Devices' public keys, compactly: what the receiver process looks keys up in.

A ``dict`` of id → 32-byte key costs about 190 B a device in CPython (the id string, the
bytes object, the table entry): 19 MB at 100,000 devices, on top of the gateway's own
registry. :class:`KeyTable` keeps each key with a 64-bit hash of its id in one
``bytearray`` slot of 40 bytes, open addressing with linear probing, at most 4/5 full:
50 to 100 B a device.

It does not keep the ids, so two ids whose hashes collide look alike and a lookup may
return the other device's key. That is safe where it is used: a report is only vouched
for when its signature verifies with the key found, and the gateway skips its own check
only when that key is the device's (see :func:`gateway.ingest.verify`). The hash is
Python's string hash, seeded at random per process, so nobody can aim for a collision.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

KEY_BYTES = 32
_SLOT = struct.Struct(f"<Q{KEY_BYTES}s")  # hash (0: empty), key
_HASH = struct.Struct("<Q")
_MASK = (1 << 64) - 1


def _hash(device_id: str) -> int:
    """A non-zero 64-bit hash of ``device_id`` (0 marks an empty slot)."""
    return (hash(device_id) & _MASK) or 1


class KeyTable:
    """Public keys by device id, in one ``bytearray``. Not thread-safe for writers: add
    from one thread; lookups may run on others meanwhile (a resize swaps in a new array)."""

    def __init__(self, keys: Iterable[tuple[str, bytes]] = (), capacity: int = 1024) -> None:
        # The array and its capacity (a power of two), swapped together on a resize.
        self._table = (bytearray(_SLOT.size * capacity), capacity)
        self._count = 0
        for device_id, key in keys:
            self.add(device_id, key)

    def __len__(self) -> int:
        return self._count

    def get(self, device_id: str) -> bytes | None:
        """The key stored for ``device_id`` (or for an id with the same hash); None if none."""
        wanted, (slots, capacity) = _hash(device_id), self._table
        index = wanted & (capacity - 1)
        while True:
            offset = index * _SLOT.size
            found = _HASH.unpack_from(slots, offset)[0]
            if found == wanted:
                return bytes(slots[offset + _HASH.size : offset + _SLOT.size])
            if found == 0:
                return None
            index = (index + 1) & (capacity - 1)

    def add(self, device_id: str, key: bytes) -> None:
        """Store ``key`` (32 bytes) for ``device_id``, replacing the one stored for it."""
        if len(key) != KEY_BYTES:
            raise ValueError(f"a public key is {KEY_BYTES} bytes, not {len(key)}")
        if (self._count + 1) * 5 > self._table[1] * 4:
            self._grow()
        if self._put(*self._table, _hash(device_id), key):
            self._count += 1

    @staticmethod
    def _put(slots: bytearray, capacity: int, wanted: int, key: bytes) -> bool:
        """Write the slot for hash ``wanted``; True when it was empty."""
        index = wanted & (capacity - 1)
        while True:
            found: int = _HASH.unpack_from(slots, index * _SLOT.size)[0]
            if found in (0, wanted):
                _SLOT.pack_into(slots, index * _SLOT.size, wanted, key)
                return not found
            index = (index + 1) & (capacity - 1)

    def _grow(self) -> None:
        old, capacity = self._table[0], self._table[1] * 2
        slots = bytearray(_SLOT.size * capacity)
        for found, key in _SLOT.iter_unpack(old):
            if found:
                self._put(slots, capacity, found, key)
        self._table = (slots, capacity)  # readers see the old table or the new one
