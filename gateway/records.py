"""A mapping that keeps most of its records packed, the recently used ones unpacked.

The registry holds a record per device and per pool, 100,000 of each in a large fleet;
as Python objects they cost about 950 bytes a device, packed about 250
(:mod:`gateway.packing`). :class:`Records` keeps every record packed, and the
``hot_limit`` most recently unpacked or written ones unpacked as well, so a busy device
is unpacked now and then, not once a report.

A record read and not changed keeps its packed form: dropping it from the unpacked ones
costs nothing. A record written is packed when it leaves them (or never, while in use),
unless it was written with its packed form (:meth:`Records.put`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, MutableMapping
from itertools import islice
from typing import TypeVar

V = TypeVar("V")
R = TypeVar("R")

HOT_LIMIT = 2048  # records kept unpacked (a few MB): a busy device stays unpacked


class Records(MutableMapping[str, V]):
    """``key -> record``, kept packed with ``pack`` and rebuilt with ``unpack(key, data)``.

    Iteration runs over a copy of the keys taken when it starts. Reading a record may
    unpack it (and pack others): only one thread reads and writes; others may only
    :meth:`peek`. The unpacked ones leave oldest first (by first use).
    """

    def __init__(
        self,
        pack: Callable[[V], bytes],
        unpack: Callable[[str, bytes], V],
        hot_limit: int = HOT_LIMIT,
    ) -> None:
        self._pack = pack
        self._unpack = unpack
        self._hot_limit = hot_limit
        self._packed: dict[str, bytes] = {}  # every record not changed since it was packed
        self._hot: dict[str, V] = {}  # the recently used, oldest first
        self._size = 0
        self._moving = threading.Lock()  # held while a record moves between the two dicts

    def load(self, packed: dict[str, bytes]) -> None:
        """Take ``packed`` (key -> packed record) as the whole content."""
        with self._moving:
            self._packed, self._hot, self._size = packed, {}, len(packed)

    def __getitem__(self, key: str) -> V:
        value = self._hot.get(key)
        if value is None:
            value = self._unpack(key, self._packed[key])
            self._hot[key] = value
            self._trim()
        return value

    def __setitem__(self, key: str, value: V) -> None:
        self.put(key, value)

    def put(self, key: str, value: V, packed: bytes | None = None) -> None:
        """``self[key] = value``; ``packed``, when given, is ``value`` packed already (by
        the ledger, for its row): kept, so that the record is not packed again when it
        leaves the unpacked ones. Without it, the record is packed then."""
        if key not in self._hot and key not in self._packed:
            self._size += 1
        with self._moving:
            self._hot[key] = value
            if packed is None:
                self._packed.pop(key, None)  # changed: packed again when it leaves the hot ones
            else:
                self._packed[key] = packed
        self._trim()

    def peek(self, key: str, packed: Callable[[bytes], R], unpacked: Callable[[V], R]) -> R | None:
        """A summary of the record ``key`` (None if there is none) that changes nothing:
        safe on other threads while this one writes (a record moving between the packed
        and the unpacked ones moves under a lock, so a reader never misses it)."""
        with self._moving:
            value = self._hot.get(key)
            data = None if value is not None else self._packed.get(key)
        if value is not None:
            return unpacked(value)
        return None if data is None else packed(data)

    def __delitem__(self, key: str) -> None:
        with self._moving:
            found = self._hot.pop(key, None) is not None
            found = self._packed.pop(key, None) is not None or found
        if not found:
            raise KeyError(key)
        self._size -= 1

    def __contains__(self, key: object) -> bool:
        return key in self._hot or key in self._packed

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[str]:
        keys = list(self._packed)
        keys.extend(key for key in self._hot if key not in self._packed)
        return iter(keys)

    def each(
        self, packed: Callable[[bytes], R], unpacked: Callable[[V], R]
    ) -> Iterator[tuple[str, R]]:
        """``(key, summary)`` of every record, without unpacking any: ``packed(data)`` of a
        packed record, ``unpacked(record)`` of one changed since it was packed."""
        with self._moving:  # both at once: none missed, whatever moves meanwhile
            kept = list(self._packed.items())
            changed = [(key, v) for key, v in self._hot.items() if key not in self._packed]
        for key, data in kept:
            yield key, packed(data)
        for key, value in changed:
            yield key, unpacked(value)

    def _trim(self) -> None:
        """Over the limit, pack the oldest quarter of the unpacked records away."""
        hot = self._hot
        if len(hot) <= self._hot_limit:
            return
        packed = self._packed
        leaving = list(islice(hot, max(1, self._hot_limit // 4)))
        repacked = {key: self._pack(hot[key]) for key in leaving if key not in packed}
        with self._moving:
            packed.update(repacked)
            for key in leaving:
                del hot[key]
