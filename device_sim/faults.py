"""Fault injection for the simulator's outgoing reports. Pure: seeded, no I/O, no clock.

A :class:`FaultPlan` turns the stream of genuine ``(topic, payload)`` reports into what is
actually published. Every genuine report is published exactly once; faults only *add*
messages or delay one, so whatever the gateway charges must still equal
``charged(final counters)`` (contract §4: duplicates, replays and late reports debit
nothing; junk is rejected). The kinds:

* ``duplicate``: the same payload again, right after it;
* ``replay``: an earlier payload of the same device, re-sent now;
* ``reorder``: the report is held back and published after the device's next one;
* ``forge``: a copy with one bit of its signature flipped (never verifies);
* ``impersonate``: another device's last valid report, published on this device's topic;
* ``malformed``: random junk (starting with 0xC1, a byte msgpack never uses).

Each kind fires independently with its probability for every genuine report; a fault that
has nothing to work with (a replay before any earlier report) is skipped, not counted.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from gateway.errors import Rejection
from gateway.wire import decode_envelope, encode_envelope

HISTORY: Final = 16  # earlier payloads kept per topic, for replays
NEVER_MSGPACK: Final = b"\xc1"  # the one byte msgpack reserves as "never used"


class FaultKind(StrEnum):
    DUPLICATE = "duplicate"
    REPLAY = "replay"
    REORDER = "reorder"
    FORGE = "forge"
    IMPERSONATE = "impersonate"
    MALFORMED = "malformed"


@dataclass(frozen=True, slots=True)
class Publication:
    """One message to publish. ``fault`` is None for a genuine report."""

    topic: str
    payload: bytes
    fault: FaultKind | None = None

    @property
    def genuine(self) -> bool:
        return self.fault is None


class FaultPlan:
    """Seeded fault injection; the same seed and input give the same output.

    Probabilities are per genuine report, each in [0, 1] (else ValueError).
    ``injected`` counts what was injected per kind; for ``reorder``, the reports held back.
    """

    def __init__(
        self,
        *,
        duplicate: float = 0.0,
        replay: float = 0.0,
        reorder: float = 0.0,
        forge: float = 0.0,
        impersonate: float = 0.0,
        malformed: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.probabilities = {
            FaultKind.DUPLICATE: duplicate,
            FaultKind.REPLAY: replay,
            FaultKind.REORDER: reorder,
            FaultKind.FORGE: forge,
            FaultKind.IMPERSONATE: impersonate,
            FaultKind.MALFORMED: malformed,
        }
        for kind, probability in self.probabilities.items():
            if not 0.0 <= probability <= 1.0:
                raise ValueError(f"{kind} probability must be within [0, 1], got {probability!r}")
        self.injected = dict.fromkeys(FaultKind, 0)
        self._rng = random.Random(seed)
        self._history: dict[str, deque[bytes]] = {}
        self._held: dict[str, list[Publication]] = {}

    @property
    def held(self) -> int:
        """How many genuine reports are held back, waiting for :meth:`drain`."""
        return sum(1 for batch in self._held.values() for p in batch if p.genuine)

    def process(self, topic: str, payload: bytes) -> list[Publication]:
        """What to publish, in order, for one genuine report (possibly nothing yet: held)."""
        fires = {kind: self._rng.random() < p for kind, p in self.probabilities.items()}
        batch = [Publication(topic, payload), *self._extras(topic, payload, fires)]
        self._history.setdefault(topic, deque(maxlen=HISTORY)).append(payload)
        released = self._held.pop(topic, [])
        if fires[FaultKind.REORDER] and not released:
            self._held[topic] = batch
            self.injected[FaultKind.REORDER] += 1
            return []
        return batch + released

    def drain(self) -> list[Publication]:
        """Release every held-back report; call it before waiting for the stream to settle."""
        released = [p for batch in self._held.values() for p in batch]
        self._held.clear()
        return released

    def apply(self, stream: Iterable[tuple[str, bytes]]) -> Iterator[Publication]:
        """:meth:`process` every report of a finite ``stream``, then :meth:`drain`."""
        for topic, payload in stream:
            yield from self.process(topic, payload)
        yield from self.drain()

    def _extras(
        self, topic: str, payload: bytes, fires: dict[FaultKind, bool]
    ) -> list[Publication]:
        makers: dict[FaultKind, Callable[[str, bytes], bytes | None]] = {
            FaultKind.DUPLICATE: lambda _topic, genuine: genuine,
            FaultKind.REPLAY: self._replay,
            FaultKind.FORGE: self._forge,
            FaultKind.IMPERSONATE: self._impersonate,
            FaultKind.MALFORMED: self._malformed,
        }
        extras = []
        for kind, make in makers.items():
            extra = make(topic, payload) if fires[kind] else None
            if extra is not None:
                extras.append(Publication(topic, extra, kind))
                self.injected[kind] += 1
        return extras

    def _replay(self, topic: str, payload: bytes) -> bytes | None:
        earlier = self._history.get(topic)
        return self._rng.choice(earlier) if earlier else None

    def _forge(self, topic: str, payload: bytes) -> bytes | None:
        envelope = decode_envelope(payload)
        if isinstance(envelope, Rejection):
            return None
        bit = self._rng.randrange(len(envelope.signature) * 8)
        signature = bytearray(envelope.signature)
        signature[bit // 8] ^= 1 << (bit % 8)
        return encode_envelope(envelope.body, bytes(signature))

    def _impersonate(self, topic: str, payload: bytes) -> bytes | None:
        others = [other for other in self._history if other != topic]
        return self._history[self._rng.choice(others)][-1] if others else None

    def _malformed(self, topic: str, payload: bytes) -> bytes:
        return NEVER_MSGPACK + self._rng.randbytes(self._rng.randrange(64))
