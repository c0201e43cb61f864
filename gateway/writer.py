"""The ledger's writer: every committing transaction runs in a process of its own.

In the gateway process a commit ran on aiosqlite's thread, and each of its statements
(BEGIN, the multi-row INSERTs, COMMIT) released the GIL while SQLite worked and then
queued to get it back behind the event loop's charging, up to the switch interval each
time; commits took twice as long as their work (docs/performance.md, "The ledger's
writer process"). This process has a GIL of its own and does nothing else:

    gateway (SqliteLedger.commit) ══["commit", statements]══▶ writer process
        BEGIN IMMEDIATE; every statement; COMMIT (WAL, synchronous=FULL)
    gateway ◀══["ok"] or ["error", text]══

Frames are gateway.frames' (length-prefixed msgpack) over a socket pair. The gateway
sends the settings first (``{"path": ..., "busy_timeout_ms": ...}``); the writer answers
``["ready", {"journal_mode": ..., "synchronous": ...}]`` (its connection's own settings)
or ``["error", text]``, then runs one transaction per ``["commit", [[sql, params], ...]]``
and answers each, in order. It exits when the gateway closes the socket, after the
transaction in hand, if any; signals that reach the whole process group (Ctrl-C, a
service manager's SIGTERM) leave it to the gateway.

Durability is SQLite's: a transaction is committed once COMMIT returns, and rolled back
if the process dies before. If it dies *after* COMMIT and before its answer, the gateway
cannot tell from the socket; :class:`~gateway.errors.WriterLost` tells it to look in the
ledger (gateway.sqlite_ledger writes a marker in every transaction for that).

This module imports only the standard library, msgpack and gateway.frames, so that the
process starts quickly.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gateway import children
from gateway.errors import LedgerError, WriterLost
from gateway.frames import frame, read_frame, read_frame_blocking
from gateway.runtime import quiet_collector

Statement = tuple[str, Sequence[Any]]  # SQL and its parameters


def run_transaction(conn: sqlite3.Connection, statements: Sequence[Statement]) -> None:
    """Run ``statements`` in one ``BEGIN IMMEDIATE`` ... ``COMMIT``; roll back on error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        for sql, parameters in statements:
            conn.execute(sql, parameters)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # some errors end the transaction themselves
            conn.execute("ROLLBACK")
        raise


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
        self._ready = False
        self.started += 1
        self._writer.write(frame(self._settings))

    async def transaction(self, statements: Sequence[Statement]) -> None:
        """Commit ``statements`` as one transaction.

        Raises :class:`LedgerError` when SQLite refused it (it was rolled back) or no
        writer could be started, :class:`WriterLost` when the writer ended while it had
        the transaction (committed or not: look it up), ``OverflowError`` or
        ``TypeError`` for a parameter msgpack cannot carry (nothing was sent).
        """
        request = frame(["commit", statements])
        async with self._lock:
            if self._writer is None or self._writer.is_closing() or self._exited():
                await self._end()
                await self.start()
            if not self._ready:
                await self._wait_ready()
            assert self._reader is not None
            assert self._writer is not None
            self._writer.write(request)
            answer = await read_frame(self._reader)
            if answer is None:
                await self._end()
                raise WriterLost("the ledger's writer process ended during a transaction")
            if answer[0] != "ok":
                raise LedgerError(str(answer[1]))

    async def _wait_ready(self) -> None:
        assert self._reader is not None
        answer = await read_frame(self._reader)
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
        writer, process = self._writer, self._process
        self._writer = self._reader = self._process = None
        await children.end(writer, process, "ledger's writer")


# --- the writer process --------------------------------------------------------------------


def serve(fd: int) -> int:
    """The writer process: open the ledger as the settings on socket ``fd`` say, then run
    and answer transactions until the gateway closes the socket. Returns the exit status."""
    with socket.socket(fileno=fd) as sock, sock.makefile("rb") as requests:
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
            sock.sendall(frame(["ready", _connection_settings(conn)]))
            while (request := read_frame_blocking(requests)) is not None:
                sock.sendall(frame(_answer(conn, request)))
    return 0


def _connect(path: str, busy_timeout_ms: int) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    conn.execute("PRAGMA synchronous = FULL")
    return conn


def _connection_settings(conn: sqlite3.Connection) -> dict[str, Any]:
    journal_mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    synchronous = conn.execute("PRAGMA synchronous").fetchone()[0]
    return {"journal_mode": journal_mode, "synchronous": synchronous}


def _answer(conn: sqlite3.Connection, request: Any) -> list[Any]:
    kind, statements = request
    if kind != "commit":
        return ["error", f"unknown request {kind!r}"]
    try:
        run_transaction(conn, statements)
    except (sqlite3.Error, OverflowError, ValueError, TypeError) as exc:
        return ["error", str(exc)]
    return ["ok"]


def main() -> int:
    # Ctrl-C and a service manager's SIGTERM reach the whole process group: the gateway
    # stops cleanly and closes the socket, and a transaction in hand is finished first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    quiet_collector()
    return serve(int(sys.argv[1]))


if __name__ == "__main__":
    sys.exit(main())
