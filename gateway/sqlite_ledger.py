"""The one place aiosqlite is used: the durable SQLite ledger.

Durability: WAL journal with ``synchronous=FULL``, so a committed transaction survives
power loss, not only a process crash (``NORMAL`` in WAL mode may lose the last commits
on power loss). One :class:`~gateway.ledger.LedgerWrite` is one ``BEGIN IMMEDIATE`` ...
``COMMIT``, written with multi-row ``INSERT`` statements (see :func:`_insert`): a few
statements per table and batch, not one per row. The statements are built here and run
in the ledger's writer process (gateway.writer), which does every write; each carries a
marker, so that a writer dying between COMMIT and its answer commits nothing twice.

In this process, one connection creates and checks the schema and serves the start-up
and admin reads; a second, read-only one serves usage queries and statements, so a long
report never holds up anything (WAL lets readers and the writer run side by side).

Sums are exact: SQLite's ``SUM`` fails on 64-bit overflow, so usage sums add the high
and low 32 bits of each value separately and Python joins them (a free meter counted up
to 2**63 in two boot epochs would otherwise break every usage query).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from gateway.economics import (
    GrantState,
    Movement,
    Pool,
)
from gateway.errors import InvalidMessage, LedgerError, WriterLost
from gateway.ledger import (
    LedgerWrite,
    PackedSnapshot,
    Snapshot,
    UsageQuery,
    UsageRow,
    unpack_snapshot,
)
from gateway.packing import DEVICE_FIELDS, device_row, pack_device_row, pack_pool
from gateway.statement import Evidence
from gateway.wire import check_control_fields
from gateway.writer import Statement, WriterProcess

log = logging.getLogger("tokenwell.gateway")
SCHEMA_VERSION = 2

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY, public_key BLOB NOT NULL, account TEXT NOT NULL,
    pool TEXT NOT NULL, used INTEGER NOT NULL, cap INTEGER, period_ms INTEGER NOT NULL,
    created_ms INTEGER NOT NULL, updated_ms INTEGER NOT NULL, revoked INTEGER NOT NULL,
    last_report_ms INTEGER,
    ctl_n INTEGER, ctl_t INTEGER, ctl_s TEXT, ctl_r INTEGER, ctl_bal INTEGER, ctl_why TEXT,
    ctl_sent INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS highs (
    device TEXT NOT NULL, boot INTEGER NOT NULL, meter TEXT NOT NULL, high INTEGER NOT NULL,
    PRIMARY KEY (device, boot, meter)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pools (
    key TEXT PRIMARY KEY, account TEXT NOT NULL, state BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS debits (
    seq INTEGER PRIMARY KEY, device TEXT NOT NULL, account TEXT NOT NULL,
    boot INTEGER NOT NULL, meter TEXT NOT NULL,
    from_units INTEGER NOT NULL, to_units INTEGER NOT NULL, tokens INTEGER NOT NULL,
    at_ms INTEGER NOT NULL, received_ms INTEGER NOT NULL,
    pool TEXT NOT NULL, overage INTEGER NOT NULL,
    CHECK (to_units > from_units AND tokens >= 0 AND overage BETWEEN 0 AND tokens)
);
CREATE INDEX IF NOT EXISTS debits_at ON debits (at_ms);
CREATE INDEX IF NOT EXISTS debits_device_at ON debits (device, at_ms);
CREATE INDEX IF NOT EXISTS debits_pool ON debits (pool);
CREATE TABLE IF NOT EXISTS evidence (
    device TEXT NOT NULL, boot INTEGER NOT NULL, hour_ms INTEGER NOT NULL,
    n INTEGER NOT NULL, envelope BLOB NOT NULL,
    PRIMARY KEY (device, boot, hour_ms)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS movements (
    seq INTEGER PRIMARY KEY, pool TEXT NOT NULL, account TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('grant', 'settle', 'forfeit')),
    tokens INTEGER NOT NULL CHECK (tokens >= 0), at_ms INTEGER NOT NULL,
    grant_seq INTEGER, grant_kind TEXT, priority INTEGER NOT NULL,
    expires_ms INTEGER, idempotency_key TEXT, device TEXT,
    UNIQUE (pool, idempotency_key)
);
"""


def _upsert(table: str, columns: Sequence[str], key: Sequence[str]) -> tuple[str, str]:
    """The head and tail of a multi-row upsert (:func:`_insert`) of ``columns`` into
    ``table``, keyed by ``key``. A row that exists is updated in place: ``INSERT OR
    REPLACE`` deleted it and inserted it anew (into the table and its key's index), which
    took the writer 8.2 -> 7.9 us of SQLite a report (docs/performance.md)."""
    changed = ", ".join(f"{c} = excluded.{c}" for c in columns if c not in key)
    head = f"INSERT INTO {table} ({', '.join(columns)})"
    return head, f" ON CONFLICT ({', '.join(key)}) DO UPDATE SET {changed}"


_DEVICE_COLUMNS = ", ".join(DEVICE_FIELDS)
_UPSERT_DEVICE = _upsert("devices", DEVICE_FIELDS, ["id"])
_KEEP_EVIDENCE = (
    "INSERT INTO evidence (device, boot, hour_ms, n, envelope)",
    " ON CONFLICT (device, boot, hour_ms) DO UPDATE SET n = excluded.n,"
    " envelope = excluded.envelope WHERE excluded.n > evidence.n",
)
_UPSERT_POOL = _upsert("pools", ["key", "account", "state"], ["key"])
_UPSERT_HIGH = _upsert("highs", ["device", "boot", "meter", "high"], ["device", "boot", "meter"])
_INSERT_DEBIT = (
    "INSERT INTO debits (device, account, boot, meter, from_units, to_units, tokens, at_ms,"
    " received_ms, pool, overage)",
    "",
)
_MOVEMENT_COLUMNS = (
    "pool, account, kind, tokens, at_ms, grant_seq, grant_kind, priority, expires_ms,"
    " idempotency_key, device"
)
_INSERT_MOVEMENT = (f"INSERT INTO movements ({_MOVEMENT_COLUMNS})", "")
_SET_META = "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)"
BUSY_TIMEOUT_MS = 5000  # how long a connection waits for another's lock
LOCAL_CACHE_KIB = 256  # the page cache of this process's own connection
_MAX_PARAMETERS = 32766 if sqlite3.sqlite_version_info >= (3, 32) else 999
_MAX_ROWS = 256  # rows per statement at most; a power of two (see _insert)
_LOAD_CHUNK = 4096  # rows fetched at once at start-up
_LOW_BITS = 2**32 - 1
_BUCKET_SQL = {
    "all": "NULL",
    "hour": "at_ms - at_ms % 3600000",
    "day": "at_ms - at_ms % 86400000",
    "month": "CAST(strftime('%s', at_ms / 1000, 'unixepoch', 'start of month') AS INTEGER) * 1000",
}


# What a refused write or a corrupt record raises (a value too big for SQLite, a bad
# stored control message, a pool record that does not decode).
_STORAGE_ERRORS = (sqlite3.Error, OverflowError, InvalidMessage, ValueError, KeyError, TypeError)


def _read_only_uri(path: Path) -> str:
    """The URI that opens ``path`` read-only. ``as_uri()`` percent-encodes: a '?', '#' or
    '%' in the path stays part of the path."""
    return f"{path.resolve().as_uri()}?mode=ro"


def public_keys_in(path: Path) -> Iterator[tuple[str, bytes]]:
    """Every device's id and public key in the ledger at ``path`` (revoked devices'
    too), read on a read-only connection of its own, in one read transaction: for the
    receiver process, which reads them while the gateway loads the rest (gateway.receiver).

    Raises :class:`~gateway.errors.LedgerError` when the file cannot be read.
    """
    try:
        conn = sqlite3.connect(_read_only_uri(path), uri=True)
    except sqlite3.Error as exc:
        raise LedgerError(f"ledger {path}: {exc}") from None
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        yield from conn.execute("SELECT id, public_key FROM devices")
    except sqlite3.Error as exc:
        raise LedgerError(f"ledger {path}: cannot read the public keys: {exc}") from None
    finally:
        conn.close()


def pool_row(pool: Pool, packed: bytes | None = None) -> tuple[str, str, bytes]:
    """The ``pools`` row of ``pool`` (``packed``: its :func:`pack_pool`, if made already)."""
    return (pool.key, pool.account, pack_pool(pool) if packed is None else packed)


def _pool_from_1(device: str, account: str, allocation: int, used: int, created: int) -> Pool:
    """A schema-1 device's flat allocation as its dedicated prepaid pool."""
    left = allocation - used
    grants = (GrantState(1, "initial", allocation, left, 0, None, created),) if left > 0 else ()
    return Pool(device, account, allocation=allocation, used=used, grants=grants, next_seq=2)


_MIGRATE_FROM_1 = (
    *(s.strip() for s in SCHEMA.split(";") if "pools" in s or "movements" in s
      or "evidence" in s),
    "ALTER TABLE devices ADD COLUMN pool TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE devices ADD COLUMN cap INTEGER",
    "ALTER TABLE devices ADD COLUMN period_ms INTEGER NOT NULL DEFAULT 0",
    "UPDATE devices SET pool = id",
    "ALTER TABLE devices DROP COLUMN allocation",
    "ALTER TABLE debits ADD COLUMN pool TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE debits ADD COLUMN overage INTEGER NOT NULL DEFAULT 0",
    "UPDATE debits SET pool = device",
    "INSERT INTO movements (pool, account, kind, tokens, at_ms, grant_kind, priority,"
    " idempotency_key, device) SELECT device, account, 'grant', tokens, at_ms, kind, 0,"
    " idempotency_key, device FROM grants ORDER BY seq",
    "DROP TABLE grants",
)  # fmt: skip


class SqliteLedger:
    """A :class:`~gateway.ledger.Ledger` in one SQLite file (created when missing)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local: aiosqlite.Connection | None = None  # schema, start-up and admin reads
        self._reader: aiosqlite.Connection | None = None  # usage queries and statements
        self.writer = WriterProcess(path, BUSY_TIMEOUT_MS)  # every transaction
        self._run = os.urandom(8)  # names this instance's commits in their markers
        self._commits = 0
        self._unresolved: tuple[LedgerWrite, bytes] | None = None  # last commit, if unknown
        self._one_commit = asyncio.Lock()

    async def open(self) -> None:
        """Open (creating folders, file and schema) and check the database is sound."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._local = await aiosqlite.connect(self.path, isolation_level=None)
            await self._local.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            mode = await self._scalar(self._local, "PRAGMA journal_mode = WAL")
            if mode != "wal":
                raise LedgerError(f"ledger {self.path}: cannot enable WAL (got {mode!r})")
            await self._local.execute("PRAGMA synchronous = FULL")
            # It only scans the tables at start-up and serves a few admin reads: a small
            # page cache (SQLite's default is 2 MiB, kept for good once filled).
            await self._local.execute(f"PRAGMA cache_size = -{LOCAL_CACHE_KIB}")
            await self._check_version()  # before the schema: an old file's tables differ
            await self._local.executescript(SCHEMA)
            self._reader = await aiosqlite.connect(_read_only_uri(self.path), uri=True)
            await self.writer.start()  # it starts while the gateway loads
        except LedgerError:
            await self.close()  # a refused file (no WAL, another schema) holds no connection
            raise
        except sqlite3.Error as exc:
            await self.close()
            raise LedgerError(f"ledger {self.path}: {exc}") from None
        except OSError as exc:
            await self.close()
            raise LedgerError(f"ledger {self.path}: {exc.strerror or exc}") from None

    async def _check_version(self) -> None:
        assert self._local is not None
        await self._local.execute(
            "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL)"
        )
        found = await self._scalar(self._local, "SELECT value FROM meta WHERE key = 'schema'")
        if found is None:
            await self._local.execute(
                "INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION).encode(),)
            )
        elif int(found) == 1:
            await self._migrate_from_1()
        elif int(found) != SCHEMA_VERSION:
            raise LedgerError(f"ledger {self.path}: schema {int(found)}, want {SCHEMA_VERSION}")

    async def _migrate_from_1(self) -> None:
        """Schema 1 (a flat allocation per device) to 2 (pools), in one transaction.

        Each device gets its dedicated prepaid pool with its allocation and used tokens;
        what is left of them becomes one ``initial`` grant; its grants (with their
        idempotency keys) become ``grant`` movements; its debits are booked on its pool.
        """
        conn = self._w
        await conn.execute("BEGIN IMMEDIATE")
        try:
            sql = "SELECT id, account, allocation, used, created_ms FROM devices"
            async with conn.execute(sql) as cursor:
                rows = list(await cursor.fetchall())
            for statement in _MIGRATE_FROM_1:
                await conn.execute(statement)
            pools = [_pool_from_1(*row) for row in rows]
            for sql, parameters in _insert(_UPSERT_POOL, [pool_row(p) for p in pools]):
                await conn.execute(sql, parameters)
            await conn.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (b"2",))
            await conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                await conn.execute("ROLLBACK")
            raise

    @staticmethod
    async def _scalar(conn: aiosqlite.Connection, sql: str, args: tuple[Any, ...] = ()) -> Any:
        async with conn.execute(sql, args) as cursor:
            row = await cursor.fetchone()
        return None if row is None else row[0]

    async def close(self) -> None:
        await self.writer.close()
        for conn in (self._reader, self._local):
            if conn is not None:
                await conn.close()
        self._reader = self._local = None

    @contextlib.contextmanager
    def _translated(self, doing: str) -> Iterator[None]:
        """Raise sqlite3's errors (and a value too big for SQLite) as LedgerError."""
        try:
            yield
        except _STORAGE_ERRORS as exc:
            raise LedgerError(f"ledger {self.path}: {doing}: {exc}") from None

    @property
    def _w(self) -> aiosqlite.Connection:
        if self._local is None:
            raise LedgerError("ledger is not open")
        return self._local

    @property
    def _r(self) -> aiosqlite.Connection:
        if self._reader is None:
            raise LedgerError("ledger is not open")
        return self._reader

    async def load(self) -> Snapshot:
        return unpack_snapshot(await self.load_packed())

    async def load_packed(self) -> PackedSnapshot:
        """Packs rows as they come (:mod:`gateway.packing`): no record objects. Stored
        control messages are checked on the way (a corrupt one is a LedgerError)."""
        with self._translated("cannot load"):
            highs: dict[str, list[tuple[int, str, int]]] = {}
            meters: dict[str, str] = {}
            sql = "SELECT device, boot, meter, high FROM highs ORDER BY device, boot, meter"
            async for device, boot, meter, high in _rows(self._w, sql):
                highs.setdefault(device, []).append((boot, meters.setdefault(meter, meter), high))
            devices: dict[str, bytes] = {}
            async for row in _rows(self._w, f"SELECT {_DEVICE_COLUMNS} FROM devices"):
                if row[9] is not None:  # ids are checked when provisioned
                    check_control_fields(*row[9:15])  # raises InvalidMessage if corrupt
                devices[row[0]] = pack_device_row(row[1:], highs.pop(row[0], ()))
            ids = {device_id: device_id for device_id in devices}  # one string per id
            pools = {
                ids.get(key, key): state
                async for key, state in _rows(self._w, "SELECT key, state FROM pools")
            }
        return PackedSnapshot(devices, pools)

    async def commit(self, write: LedgerWrite) -> None:
        """One transaction, in the writer process (gateway.writer).

        Each transaction also writes a marker naming it (``meta`` ``last_commit``): when
        the writer dies with a transaction in hand, the marker says whether it committed.
        Committed, the commit succeeded; rolled back, a new writer runs it once more, and
        if that one dies too, :class:`~gateway.errors.WriterLost` is raised for the caller
        to retry. A commit that ended without a known outcome (that error, a failed look-up,
        a cancellation) and is retried with the same ``write`` keeps its marker, and the
        retry first looks it up. So a transaction is committed once, or not at all.
        Commits run one at a time.
        """
        self._w  # noqa: B018 (raises LedgerError when the ledger is not open)
        async with self._one_commit:
            with self._translated("commit failed"):
                await self._commit(write)

    async def _commit(self, write: LedgerWrite) -> None:
        marker = await self._marker_for(write)
        if marker is None:
            return  # an earlier attempt of this very write did commit

        def statements() -> Iterator[Statement]:  # built anew, lazily, for each attempt
            yield from _statements(write)
            yield _SET_META, ["last_commit", marker]

        for attempt in (1, 2):
            try:
                await self.writer.transaction(statements())
                break
            except WriterLost:
                # The writer has exited (its socket closed): it can commit no more.
                if await self.get_meta("last_commit") == marker:
                    log.warning("the ledger's writer process ended after committing")
                    break
                if attempt == 2:
                    raise  # rolled back, twice: the caller retries later
                log.warning("the ledger's writer process ended: a new one commits")
        self._unresolved = None

    async def _marker_for(self, write: LedgerWrite) -> bytes | None:
        """The marker for committing ``write``: a new one, or, when the last commit was of
        this very write and its outcome is unknown, that one's (None if it committed)."""
        if self._unresolved is not None and self._unresolved[0] is write:
            marker = self._unresolved[1]
            if await self.get_meta("last_commit") == marker:
                self._unresolved = None
                return None
            return marker
        self._commits += 1
        marker = self._run + self._commits.to_bytes(8, "big")
        self._unresolved = (write, marker)
        return marker

    async def find_grant(self, pool: str, idempotency_key: str) -> Movement | None:
        sql = (
            f"SELECT {_MOVEMENT_COLUMNS} FROM movements"
            " WHERE pool = ? AND idempotency_key = ? AND kind = 'grant'"
        )
        with self._translated("cannot read grants"):
            async with self._w.execute(sql, (pool, idempotency_key)) as cursor:
                row = await cursor.fetchone()
        return None if row is None else Movement(*row)

    async def usage(self, query: UsageQuery) -> list[UsageRow]:
        where, args = _usage_filters(query)
        bucket = _BUCKET_SQL[query.bucket]
        sql = (
            f"SELECT {bucket} AS b, device, account, meter, {_exact_sum('to_units - from_units')},"
            f" {_exact_sum('tokens')}, {_exact_sum('overage')} FROM debits {where}"
            " GROUP BY b, device, account, meter"
            " ORDER BY b, device, account, meter"
        )
        with self._translated("usage query failed"):
            async with self._r.execute(sql, args) as cursor:
                rows = await cursor.fetchall()
        return [
            UsageRow(
                b,
                device,
                account,
                meter,
                (u_hi << 32) + u_lo,
                (t_hi << 32) + t_lo,
                (o_hi << 32) + o_lo,
            )
            for b, device, account, meter, u_hi, u_lo, t_hi, t_lo, o_hi, o_lo in rows
        ]

    async def evidence(self, devices: Sequence[str], before_ms: int) -> list[Evidence]:
        # One query for all the devices (their ids as a JSON array: no limit on how many
        # parameters); SQLite's MAX() takes the other columns from the row holding it.
        sql = (
            "SELECT device, boot, MAX(n), hour_ms, envelope FROM evidence"
            " WHERE device IN (SELECT value FROM json_each(?)) AND hour_ms < ?"
            " GROUP BY device, boot ORDER BY device, boot"
        )
        ids = json.dumps(sorted(set(devices)))
        with self._translated("cannot read evidence"):
            async with self._r.execute(sql, (ids, before_ms)) as cursor:
                rows = await cursor.fetchall()
        return [Evidence(d, b, n, h, bytes(e)) for d, b, n, h, e in rows]

    async def totals(self, pool: str) -> tuple[int, int]:
        sums = []
        signed = "CASE kind WHEN 'forfeit' THEN -tokens ELSE tokens END"
        with self._translated("cannot read totals"):
            for table, value in (("movements", signed), ("debits", "tokens")):
                sql = f"SELECT {_exact_sum(value)} FROM {table} WHERE pool = ?"
                async with self._r.execute(sql, (pool,)) as cursor:
                    high, low = await cursor.fetchone() or (None, None)
                sums.append(((high or 0) << 32) + (low or 0))
        return sums[0], sums[1]

    async def get_meta(self, key: str) -> bytes | None:
        with self._translated("cannot read meta"):
            value = await self._scalar(self._w, "SELECT value FROM meta WHERE key = ?", (key,))
        return None if value is None else bytes(value)

    async def set_meta(self, key: str, value: bytes) -> None:
        self._w  # noqa: B018 (raises LedgerError when the ledger is not open)
        with self._translated("cannot write meta"):
            await self.writer.transaction([(_SET_META, [key, value])])


async def _rows(conn: aiosqlite.Connection, sql: str) -> AsyncIterator[sqlite3.Row]:
    """The rows of ``sql``, fetched a few thousand at a time: at start-up, all 100,000
    raw rows held at once beside the records built from them raised the peak memory
    (which the process keeps) by about 500 bytes per device."""
    async with conn.execute(sql) as cursor:
        while rows := await cursor.fetchmany(_LOAD_CHUNK):
            for row in rows:
                yield row


def _statements(write: LedgerWrite) -> Iterator[Statement]:
    """The statements that commit ``write``: a few multi-row ``INSERT``s per table, built
    one at a time as they are taken."""
    yield from _insert(_UPSERT_DEVICE, [device_row(d) for d in write.devices])
    pools = [pool_row(p, data) for p, data in write.packed_pools().values()]
    yield from _insert(_UPSERT_POOL, pools)
    yield from _insert(_UPSERT_HIGH, write.highs)  # named tuples in column order
    yield from _insert(_INSERT_DEBIT, write.debits)
    yield from _insert(_INSERT_MOVEMENT, [_movement_row(m) for m in write.movements])
    evidence = [(e.device, e.boot, e.hour_ms, e.n, e.envelope) for e in write.evidence]
    yield from _insert(_KEEP_EVIDENCE, evidence)


def _insert(into: tuple[str, str], rows: Sequence[tuple[Any, ...]]) -> Iterator[Statement]:
    """``rows`` (in order) as statements ``head`` ``SELECT`` rows ``tail`` (``into``), up to
    ``_MAX_ROWS`` rows to a statement.

    Why not ``executemany``: sqlite3 releases the GIL around every row it steps and takes
    it back for the next; when other threads want it, each row queues for it again, up to
    the 5 ms switch interval each time (a commit of 500 reports took 8.5 s beside one busy
    Python thread, 10 ms without, when commits ran in the gateway process). A multi-row
    ``INSERT`` is one step, and binds its parameters in one call.

    Each statement holds a power of two of rows, padded with copies of the last row that
    its ``LIMIT`` leaves out: so there are at most nine distinct statements per table for
    sqlite3 to cache. (Cached statements of every size up to 1,000 rows, 1.6 MB each, took
    the gateway from 1.8 to 2.6 KB per device.)
    """
    if not rows:
        return
    head, tail = into
    width = len(rows[0])
    per_statement = min(_MAX_ROWS, 1 << ((_MAX_PARAMETERS // width).bit_length() - 1))
    for start in range(0, len(rows), per_statement):
        chunk = list(rows[start : start + per_statement])
        size = 1 << (len(chunk) - 1).bit_length()
        padded = chunk + [chunk[-1]] * (size - len(chunk))
        yield _sql(head, width, size, tail), [v for row in padded for v in row] + [len(chunk)]


@functools.lru_cache(maxsize=64)
def _sql(head: str, width: int, size: int, tail: str) -> str:
    """``head`` ``SELECT`` from ``size`` rows of ``width`` parameters, the first ``?`` of
    them (the last parameter), then ``tail``. ``WHERE true`` keeps an ``ON CONFLICT`` tail
    from being read as part of the ``SELECT``."""
    values = ", ".join(["(" + ", ".join("?" * width) + ")"] * size)
    return f"{head} SELECT * FROM (VALUES {values}) WHERE true LIMIT ?{tail}"


def _exact_sum(expr: str) -> str:
    """Two SQL sums, of the high and of the low 32 bits of ``expr``: neither overflows."""
    return f"SUM(({expr}) >> 32), SUM(({expr}) & {_LOW_BITS})"


def _movement_row(m: Movement) -> tuple[Any, ...]:
    return (
        m.pool, m.account, m.kind, m.tokens, m.at_ms, m.grant_seq, m.grant_kind, m.priority,
        m.expires_ms, m.idempotency_key, m.device,
    )  # fmt: skip


def _usage_filters(query: UsageQuery) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    args: list[Any] = []
    for column, value in (
        ("device", query.device),
        ("account", query.account),
        ("meter", query.meter),
    ):
        if value is not None:
            clauses.append(f"{column} = ?")
            args.append(value)
    if query.since_ms is not None:
        clauses.append("at_ms >= ?")
        args.append(query.since_ms)
    if query.until_ms is not None:
        clauses.append("at_ms < ?")
        args.append(query.until_ms)
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", args
