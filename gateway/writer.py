"""The ledger's writer: every committing transaction runs in a process of its own.

In the gateway process a commit ran on aiosqlite's thread, and each of its statements
(BEGIN, the multi-row INSERTs, COMMIT) released the GIL while SQLite worked and then
queued to get it back behind the event loop's charging, up to the switch interval each
time; commits took twice as long as their work (docs/performance.md, "The ledger's
writer process"). This process has a GIL of its own and does nothing else:

    gateway (SqliteLedger.commit) ══["run", sql, params] ... ["commit"]══▶ writer process
        BEGIN IMMEDIATE; each statement as it comes; COMMIT (WAL, synchronous=FULL)
    gateway ◀══["ok"] or ["error", text]══

Frames are gateway.frames' (length-prefixed msgpack) over a socket pair. The gateway
sends the settings first (``{"path": ..., "busy_timeout_ms": ...}``); the writer answers
``["ready", {"journal_mode": ..., "synchronous": ..., "temp_store": ...}]`` (its
connection's own settings)
or ``["error", text]``. Then a transaction is its statements, a frame each,
``["run", sql, params]`` (run as they arrive), and ``["commit"]``, which the writer
answers ``["ok"]`` or ``["error", text]`` (:class:`Transactions`). It exits when the
gateway closes the socket, after the transaction in hand, if any; signals that reach the
whole process group (Ctrl-C, a service manager's SIGTERM) leave it to the gateway.

Durability is SQLite's: a transaction is committed once COMMIT returns, and rolled back
if the process dies before. If it dies *after* COMMIT and before its answer, the gateway
cannot tell from the socket; :class:`~gateway.errors.WriterLost` tells it to look in the
ledger (gateway.sqlite_ledger writes a marker in every transaction for that).

This module imports little beside the standard library (msgpack, and gateway.frames,
gateway.children, gateway.errors), so that the process starts quickly.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import io
import logging
import os
import signal
import socket
import sqlite3
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from gateway import children
from gateway.errors import LedgerError, WriterLost
from gateway.frames import frame, read_frame, read_frame_blocking
from gateway.runtime import quiet_collector

log = logging.getLogger("tokenwell.gateway")
Statement = tuple[str, Sequence[Any]]  # SQL and its parameters
PRIORITY_BOOST = 5  # nice levels the writer runs above the gateway, where allowed
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies
# The writer's page cache (SQLite's default is 2 MiB). Each commit touches the pages of
# the devices that reported; the operating system caches the file anyway, and at 100,000
# devices the ledger is far larger than either size (resident memory a device matters
# more there, docs/performance.md).
CACHE_KIB = 1024
# Where SQLite keeps its temporary files: a multi-row statement inside a transaction has
# a statement journal (the pages it changes, to undo it alone), and with SQLite's default
# each transaction created, unlinked and wrote a file for it in /var/tmp: at 8,000
# reports/s, 300 files a second and 11,000 writes a second, half the writer's. In
# memory: the writer 28.2 -> 26.1 us of CPU a report (four alternated pairs), resident
# memory at 100,000 devices the same (docs/performance.md, an eleventh session). What
# survives a crash is the WAL's business: a statement journal is never read after one.
TEMP_STORE = "MEMORY"
# A transaction's frames go to the writer in writes of about this size (a small one in one
# write, with its commit): each write wakes the writer, and a wake-up of a process on the
# other core is dear, above all in a virtual machine (docs/performance.md, "Fewer
# wake-ups"). The writer reads with a buffer of the same size.
SEND_BYTES = 64 * 1024


REFUSED = (sqlite3.Error, OverflowError, ValueError, TypeError)  # what SQLite may refuse


class Transactions:
    """The writer's side of the protocol, request by request (no I/O): statements run as
    they arrive, inside one ``BEGIN IMMEDIATE``; ``COMMIT`` at the end. After a statement
    is refused, the transaction is rolled back, the rest of its statements are skipped,
    and its end answers the error."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._error: str | None = None

    def run(self, sql: str, parameters: Sequence[Any]) -> None:
        """One statement of the transaction in hand (the first begins it)."""
        if self._error is not None:
            return
        try:
            if not self._conn.in_transaction:
                self._conn.execute("BEGIN IMMEDIATE")
            self._conn.execute(sql, parameters)
        except REFUSED as exc:
            self._refused(str(exc))

    def commit(self) -> list[Any]:
        """End the transaction in hand: ``["ok"]`` once committed, else ``["error", why]``
        (rolled back)."""
        try:
            if self._error is None and self._conn.in_transaction:
                self._conn.execute("COMMIT")
        except REFUSED as exc:
            self._refused(str(exc))
        error, self._error = self._error, None
        return ["ok"] if error is None else ["error", error]

    def _refused(self, error: str) -> None:
        self._error = error
        if self._conn.in_transaction:  # some errors end the transaction themselves
            self._conn.execute("ROLLBACK")


# --- the gateway's side --------------------------------------------------------------------


class WriterProcess:
    """The writer process of the ledger at ``path``, from the gateway's side.

    :meth:`start` spawns it (its interpreter starts while the gateway loads); the first
    :meth:`transaction` waits until it is ready. One transaction is with it at a time. A
    writer that has died is replaced by the next transaction.
    """

    def __init__(self, path: Path, busy_timeout_ms: int) -> None:
        self._settings = {"path": str(path), "busy_timeout_ms": busy_timeout_ms}
        self._process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._ready = False
        self._unsettled = False  # a transaction was left half sent or unanswered
        self._lock = asyncio.Lock()
        self.connection_settings: dict[str, Any] = {}  # what the writer's connection uses
        self.started = 0  # writer processes started so far

    @property
    def pid(self) -> int | None:
        """The current writer process's id, if one was started."""
        return self._process.pid if self._process is not None else None

    async def start(self) -> None:
        """Spawn a writer process and send it its settings (does not wait for it)."""
        self._process, self._reader, self._writer = await children.spawn("gateway.writer")
        _raise_priority(self._process.pid, self.started == 0)
        self._ready = False
        self.started += 1
        self._writer.write(frame(self._settings))

    async def transaction(self, statements: Iterable[Statement]) -> None:
        """Commit ``statements`` as one transaction.

        Each statement goes as a frame of its own, encoded as it is taken from
        ``statements`` (a generator, say) and sent once ``SEND_BYTES`` have gathered, so
        that neither process holds a large transaction's parameters all at once; the
        writer runs each as it arrives. A small transaction is one write, its commit
        included.

        Raises :class:`LedgerError` when SQLite refused it (it was rolled back) or no
        writer could be started, :class:`WriterLost` when the writer ended while it had
        the transaction (committed or not: look it up). Whatever ``statements`` or the
        encoding raise (``OverflowError`` for an integer msgpack cannot carry) comes
        out as it is, the transaction rolled back. So does a cancellation: a transaction
        left half sent, or its answer unread, is never mixed with the next one, which
        starts by replacing this writer (it finishes what it had, and exits).
        """
        async with self._lock:
            if (
                self._unsettled
                or self._writer is None
                or self._writer.is_closing()
                or self._exited()
            ):
                await self._end()
                try:
                    await self.start()
                except OSError as exc:  # no file descriptors, no memory to fork
                    raise LedgerError(f"cannot start the ledger's writer: {exc}") from None
            if not self._ready:
                await self._wait_ready()
            reader, writer = self._reader, self._writer
            assert reader is not None
            assert writer is not None
            pending = bytearray()
            for sql, parameters in statements:
                pending += frame(["run", sql, parameters])  # what it raises, it raises here
                if len(pending) >= SEND_BYTES:
                    self._unsettled = True  # until the answer is read
                    writer.write(pending)
                    pending = bytearray()
                    with contextlib.suppress(ConnectionError):  # a dead writer: the read says so
                        await writer.drain()
            self._unsettled = True
            pending += frame(["commit"])
            writer.write(pending)
            answer = await read_frame(reader)
            self._unsettled = False
            if answer is None:
                await self._end()
                raise WriterLost("the ledger's writer process ended during a transaction")
            if answer[0] != "ok":
                raise LedgerError(str(answer[1]))

    async def _wait_ready(self) -> None:
        assert self._reader is not None
        self._unsettled = True  # a wait cut short leaves the answer unread
        answer = await read_frame(self._reader)
        self._unsettled = False
        if not isinstance(answer, list) or answer[0] != "ready":
            await self._end()
            reason = answer[1] if isinstance(answer, list) else "it exited while starting"
            raise LedgerError(f"the ledger's writer process could not start: {reason}")
        self.connection_settings = answer[1]
        self._ready = True

    def _exited(self) -> bool:
        return self._process is None or self._process.returncode is not None

    async def close(self) -> None:
        """Close its socket and wait for it to exit (see gateway.children)."""
        async with self._lock:
            await self._end()

    async def _end(self) -> None:
        """End the writer; forget it only once it has exited (a cancelled wait leaves it
        known, for :meth:`close` or the next transaction to wait for again)."""
        writer, process = self._writer, self._process
        await children.end(writer, process, "ledger's writer")
        if process is self._process:
            self._writer = self._reader = self._process = None
            self._unsettled = False


def _raise_priority(pid: int, first: bool) -> None:
    """Run the writer ``PRIORITY_BOOST`` nice levels above the gateway, if allowed.

    Every report waits for a commit, one at a time, and a commit is little CPU but has to
    get it at once: when the receiver's verifying threads and the event loop keep both
    cores busy, the scheduler made it wait its turn behind them (at 9,000 reports/s, six
    runs alternated: report -> control p50 14-26 against 17-36 ms, docs/performance.md).
    Raising a priority takes root or ``CAP_SYS_NICE``; without, the writer runs at the
    gateway's, as everything else does, and the first start says so.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, pid, os.getpriority(os.PRIO_PROCESS, 0) - PRIORITY_BOOST)
    except ProcessLookupError:
        return  # already gone: the next transaction says so
    except OSError as exc:  # PermissionError without the capability
        if first:
            log.info("the ledger's writer runs at the gateway's priority (%s): give the "
                     "gateway CAP_SYS_NICE to let commits go first under load", exc)  # fmt: skip


# --- the writer process --------------------------------------------------------------------


def serve(fd: int) -> int:
    """The writer process: open the ledger as the settings on socket ``fd`` say, then run
    and answer transactions until the gateway closes the socket. Returns the exit status."""
    with (
        socket.socket(fileno=fd) as sock,
        io.BufferedReader(sock.makefile("rb", buffering=0), SEND_BYTES) as requests,
    ):
        settings = read_frame_blocking(requests)
        if settings is None:
            return 1
        try:
            conn = _connect(settings["path"], settings["busy_timeout_ms"])
        except sqlite3.Error as exc:
            sock.sendall(frame(["error", str(exc)]))
            return 1
        with contextlib.closing(conn), contextlib.suppress(ConnectionError):
            # A ConnectionError: the gateway is gone (killed). The transaction in hand, if
            # any, is committed or not, as SQLite decided; the next gateway reads which.
            # (Closing the connection rolls back one that was not committed.)
            sock.sendall(frame(["ready", _connection_settings(conn)]))
            transactions = Transactions(conn)
            while (request := read_frame_blocking(requests)) is not None:
                if request[0] == "run":
                    transactions.run(request[1], request[2])
                else:  # "commit"
                    sock.sendall(frame(transactions.commit()))
    return 0


def _connect(path: str, busy_timeout_ms: int) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
    conn.execute(f"PRAGMA temp_store = {TEMP_STORE}")
    return conn


def _connection_settings(conn: sqlite3.Connection) -> dict[str, Any]:
    journal_mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    synchronous = conn.execute("PRAGMA synchronous").fetchone()[0]
    temp_store = conn.execute("PRAGMA temp_store").fetchone()[0]
    return {"journal_mode": journal_mode, "synchronous": synchronous, "temp_store": temp_store}


def die_with_parent() -> None:
    """Have the kernel kill this process (SIGKILL) the moment the gateway dies (Linux's
    ``PR_SET_PDEATHSIG``).

    A writer that outlived a killed gateway could commit a transaction it still had (one
    waiting for another connection's lock, say) after the next gateway had loaded the
    ledger: that gateway would not know of it, and the broker would redeliver the batch,
    charged then a second time. Killed with the gateway, a transaction not committed yet
    is rolled back, and whatever was committed is there before anyone loads. (A gateway
    that died before this call sent no transaction: the first waits for ``ready``, which
    comes after it.)
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def main() -> int:
    # Ctrl-C and a service manager's SIGTERM reach the whole process group: the gateway
    # stops cleanly and closes the socket, and a transaction in hand is finished first.
    # When the gateway dies, this process dies with it (die_with_parent).
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    quiet_collector()
    return serve(int(sys.argv[1]))


if __name__ == "__main__":
    sys.exit(main())
