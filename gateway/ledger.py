"""The ledger's interface, its records, and an in-memory fake.

The ledger is the durable truth. The gateway computes a batch of effects with the pure
core, hands them to :meth:`Ledger.commit` as one :class:`LedgerWrite` (one transaction:
all of it or none of it), and only then acknowledges the MQTT messages and makes the new
state visible. Debits and movements (grants, settled overage, forfeits) are append-only;
for every pool, ``sum(grants) + sum(settles) - sum(forfeits) - sum(debits)`` equals its
balance (:func:`Ledger.totals` returns the two sides).

:class:`MemoryLedger` passes the same contract tests as the SQLite ledger
(``tests/test_ledger_contract.py``); tests of the service use it where durability is not
the point.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Protocol

from gateway.economics import Movement, Pool
from gateway.errors import LedgerError
from gateway.metering import Device
from gateway.packing import pack_device, pack_pool, unpack_device, unpack_pool
from gateway.statement import Evidence

Bucket = Literal["hour", "day", "month", "all"]
BUCKETS: tuple[Bucket, ...] = ("hour", "day", "month", "all")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_INT64 = range(-(2**63), 2**63)  # what SQLite's INTEGER holds


class HighMark(NamedTuple):
    """``H`` for one (device, boot epoch, meter): the highest cumulative count charged.

    A named tuple, like :class:`Debit`: one is built for every report charged, and its
    fields are in the order of the SQL row it becomes (a fifth of a frozen dataclass's
    cost to build, and no row to convert)."""

    device: str
    boot: int
    meter: str
    high: int


class Debit(NamedTuple):
    """One meter's advance charged from one report (append-only); its fields are in the
    order of the ``debits`` table's columns (see :class:`HighMark`)."""

    device: str
    account: str
    boot: int
    meter: str
    from_units: int
    to_units: int
    tokens: int
    at_ms: int  # when the usage is attributed to (see metering.attributed_time)
    received_ms: int
    pool: str = ""  # the pool debited
    overage: int = 0  # of ``tokens``, those past the pool's zero (billed as overage)


@dataclass(slots=True)
class LedgerWrite:
    """Everything one transaction changes. Devices are written whole (upsert)."""

    devices: list[Device] = field(default_factory=list)
    pools: list[Pool] = field(default_factory=list)
    highs: list[HighMark] = field(default_factory=list)
    debits: list[Debit] = field(default_factory=list)
    movements: list[Movement] = field(default_factory=list)
    evidence: list[Evidence] = field(default_factory=list)  # kept unless a later n is
    _packed: dict[str, tuple[Pool, bytes]] | None = field(default=None, repr=False, compare=False)

    def packed_pools(self) -> dict[str, tuple[Pool, bytes]]:
        """Each of :attr:`pools` with its packed form (:func:`pack_pool`), packed on first
        call only (so call it once the write is complete): the SQLite ledger's row and the
        registry's record share one packing (at 100,000 devices each report's pool was
        packed twice, docs/performance.md)."""
        if self._packed is None:
            self._packed = {pool.key: (pool, pack_pool(pool)) for pool in self.pools}
        return self._packed

    def __bool__(self) -> bool:
        return bool(
            self.devices or self.pools or self.highs or self.debits or self.movements
            or self.evidence
        )  # fmt: skip

    @classmethod
    def combined(cls, writes: Sequence[LedgerWrite]) -> LedgerWrite:
        """One write with the effect of committing ``writes`` one after the other: the
        last value of each device, pool and high mark; every debit, movement and piece of
        evidence, in order (group commit: one transaction, one fsync, for several)."""
        if len(writes) == 1:
            return writes[0]
        devices = {d.id: d for w in writes for d in w.devices}
        pools = {p.key: p for w in writes for p in w.pools}
        highs = {(h.device, h.boot, h.meter): h for w in writes for h in w.highs}
        return cls(
            list(devices.values()),
            list(pools.values()),
            list(highs.values()),
            [d for w in writes for d in w.debits],
            [m for w in writes for m in w.movements],
            [e for w in writes for e in w.evidence],
        )


@dataclass(frozen=True, slots=True)
class UsageQuery:
    """Filters for :meth:`Ledger.usage`; times are attributed times in ms, ``until`` exclusive."""

    device: str | None = None
    account: str | None = None
    meter: str | None = None
    since_ms: int | None = None
    until_ms: int | None = None
    bucket: Bucket = "all"


@dataclass(frozen=True, slots=True)
class UsageRow:
    """Units and tokens of one meter of one device within one bucket (start in ms, UTC);
    ``overage``: of those tokens, the ones past its pool's zero (billed separately)."""

    bucket_start_ms: int | None
    device: str
    account: str
    meter: str
    units: int
    tokens: int
    overage: int = 0


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the gateway loads at start-up to rebuild its in-memory state.

    ``H`` lives in ``highs`` only: the ``devices`` come back with empty ``Device.highs``
    (whatever they carried when written), and the caller puts the two together.
    """

    devices: list[Device]
    highs: list[HighMark]
    pools: list[Pool] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class PackedSnapshot:
    """What the gateway loads at start-up, as packed records (:mod:`gateway.packing`):
    device id -> packed device (with its ``H``), pool key -> packed pool."""

    devices: dict[str, bytes]
    pools: dict[str, bytes]


def pack_snapshot(
    devices: Iterable[Device], highs: Iterable[HighMark], pools: Iterable[Pool]
) -> PackedSnapshot:
    """``devices`` (each with the ``H`` of ``highs``) and ``pools``, packed."""
    marks: dict[str, list[tuple[int, str, int]]] = defaultdict(list)
    for mark in highs:
        marks[mark.device].append((mark.boot, mark.meter, mark.high))
    return PackedSnapshot(
        {d.id: pack_device(d._replace(highs=tuple(sorted(marks[d.id])))) for d in devices},
        {pool.key: pack_pool(pool) for pool in pools},
    )


def unpack_snapshot(packed: PackedSnapshot) -> Snapshot:
    """The :class:`Snapshot` of ``packed``: devices without their ``H``, which comes apart."""
    names: dict[str, str] = {}
    devices: list[Device] = []
    highs: list[HighMark] = []
    for device_id, data in packed.devices.items():
        device = unpack_device(device_id, data, names)
        highs.extend(HighMark(device_id, b, m, h) for b, m, h in device.highs)
        devices.append(device._replace(highs=()))
    pools = [unpack_pool(key, data, names) for key, data in packed.pools.items()]
    return Snapshot(devices, highs, pools)


class Ledger(Protocol):
    """The durable store. Every method may raise :class:`~gateway.errors.LedgerError`."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def load(self) -> Snapshot: ...

    async def load_packed(self) -> PackedSnapshot:
        """What :meth:`load` returns, packed: a start-up builds no record objects."""

    async def commit(self, write: LedgerWrite) -> None:
        """Apply ``write`` atomically and durably; on error nothing of it is applied."""

    async def find_grant(self, pool: str, idempotency_key: str) -> Movement | None:
        """The grant to ``pool`` made under ``idempotency_key``, if any."""

    async def usage(self, query: UsageQuery) -> list[UsageRow]: ...

    async def evidence(self, devices: Sequence[str], before_ms: int) -> list[Evidence]:
        """Per (device, boot epoch) of ``devices``, the evidence with the greatest ``n``
        among those attributed to an hour before ``before_ms``."""

    async def totals(self, pool: str) -> tuple[int, int]:
        """``(grants + settles - forfeits, debits)`` of ``pool``: their difference is the
        pool's balance (the conservation invariant's two sides)."""

    async def get_meta(self, key: str) -> bytes | None: ...

    async def set_meta(self, key: str, value: bytes) -> None: ...


def bucket_start(at_ms: int, bucket: Bucket) -> int | None:
    """The UTC start (ms) of the bucket holding ``at_ms``; None for ``all``."""
    if bucket == "all":
        return None
    if bucket == "hour":
        return at_ms - at_ms % 3_600_000
    if bucket == "day":
        return at_ms - at_ms % 86_400_000
    moment = _EPOCH + dt.timedelta(milliseconds=at_ms)
    start = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return (start - _EPOCH) // dt.timedelta(milliseconds=1)


class MemoryLedger:
    """An in-memory :class:`Ledger`: same contract, no durability.

    It refuses what SQLite refuses, with :class:`LedgerError` and nothing applied: a
    second grant with the same ``(device, idempotency_key)``, a debit that does not
    advance or costs less than nothing, an integer outside 64 bits.
    """

    def __init__(self) -> None:
        self.devices: dict[str, Device] = {}
        self.pools: dict[str, Pool] = {}
        self.highs: dict[tuple[str, int, str], int] = {}
        self.debits: list[Debit] = []
        self.movements: list[Movement] = []
        self.kept: dict[tuple[str, int, int], Evidence] = {}
        self.meta: dict[str, bytes] = {}
        self.commits = 0

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def load(self) -> Snapshot:
        highs = [HighMark(d, b, m, h) for (d, b, m), h in self.highs.items()]
        return Snapshot(list(self.devices.values()), highs, list(self.pools.values()))

    async def load_packed(self) -> PackedSnapshot:
        snapshot = await self.load()
        return pack_snapshot(snapshot.devices, snapshot.highs, snapshot.pools)

    async def commit(self, write: LedgerWrite) -> None:
        self._check(write)  # first, so that a refused write applies nothing
        self.devices.update((device.id, device._replace(highs=())) for device in write.devices)
        self.pools.update((pool.key, pool) for pool in write.pools)
        self.highs.update(((h.device, h.boot, h.meter), h.high) for h in write.highs)
        self.debits.extend(write.debits)
        self.movements.extend(write.movements)
        for item in write.evidence:
            key = (item.device, item.boot, item.hour_ms)
            if key not in self.kept or self.kept[key].n < item.n:
                self.kept[key] = item
        self.commits += 1

    def _check(self, write: LedgerWrite) -> None:
        keys = {(m.pool, m.idempotency_key) for m in self.movements} if write.movements else set()
        for grant in write.movements:
            key = (grant.pool, grant.idempotency_key)
            if grant.idempotency_key is not None and key in keys:  # NULLs never clash
                raise LedgerError(f"commit failed: grant {key} exists")
            keys.add(key)
        for d in write.debits:
            if not (d.to_units > d.from_units and d.tokens >= 0):
                raise LedgerError(f"commit failed: debit {d} does not advance")
        numbers = [
            *(n for d in write.devices for n in (d.used, d.created_ms)),
            *(n for p in write.pools for n in (p.allocation, p.used, p.settled, p.forfeited)),
            *(h.high for h in write.highs),
            *(n for d in write.debits for n in (d.from_units, d.to_units, d.tokens, d.at_ms)),
            *(m.tokens for m in write.movements),
        ]
        if any(n not in _INT64 for n in numbers):
            raise LedgerError("commit failed: an integer does not fit in 64 bits")

    async def find_grant(self, pool: str, idempotency_key: str) -> Movement | None:
        for grant in self.movements:
            if grant.pool == pool and grant.idempotency_key == idempotency_key:
                return grant
        return None

    async def usage(self, query: UsageQuery) -> list[UsageRow]:
        return summarize(filter_debits(self.debits, query), query.bucket)

    async def evidence(self, devices: Sequence[str], before_ms: int) -> list[Evidence]:
        best: dict[tuple[str, int], Evidence] = {}
        wanted = set(devices)
        for item in self.kept.values():
            key = (item.device, item.boot)
            if item.device not in wanted or item.hour_ms >= before_ms:
                continue
            if key not in best or best[key].n < item.n:
                best[key] = item
        return [best[key] for key in sorted(best)]

    async def totals(self, pool: str) -> tuple[int, int]:
        sign = {"grant": 1, "settle": 1, "forfeit": -1}
        credits = sum(sign[m.kind] * m.tokens for m in self.movements if m.pool == pool)
        return credits, sum(d.tokens for d in self.debits if d.pool == pool)

    async def get_meta(self, key: str) -> bytes | None:
        return self.meta.get(key)

    async def set_meta(self, key: str, value: bytes) -> None:
        self.meta[key] = value


def filter_debits(debits: Iterable[Debit], query: UsageQuery) -> list[Debit]:
    """The debits matching ``query``'s filters."""
    return [
        d
        for d in debits
        if (query.device is None or d.device == query.device)
        and (query.account is None or d.account == query.account)
        and (query.meter is None or d.meter == query.meter)
        and (query.since_ms is None or d.at_ms >= query.since_ms)
        and (query.until_ms is None or d.at_ms < query.until_ms)
    ]


def summarize(debits: Sequence[Debit], bucket: Bucket) -> list[UsageRow]:
    """Group debits by (bucket, device, account, meter), in that sort order."""
    sums: dict[tuple[int | None, str, str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    for d in debits:
        key = (bucket_start(d.at_ms, bucket), d.device, d.account, d.meter)
        sums[key][0] += d.to_units - d.from_units
        sums[key][1] += d.tokens
        sums[key][2] += d.overage
    ordered = sorted(sums.items(), key=lambda kv: (kv[0][0] or 0, *kv[0][1:]))
    return [UsageRow(*key, *totals) for key, totals in ordered]
