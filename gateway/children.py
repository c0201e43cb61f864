"""The gateway's child processes (the receiver, gateway.receiver; the ledger's writer,
gateway.writer): each runs ``python -m MODULE FD`` and talks to the gateway over a socket
pair (gateway.frames); closing its end tells it to finish and exit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys

log = logging.getLogger("tokenwell.gateway")
STOP_TIMEOUT = 10.0  # seconds a child has to exit after its socket is closed

Child = tuple[asyncio.subprocess.Process, asyncio.StreamReader, asyncio.StreamWriter]


async def spawn(module: str, nice: int | None = None) -> Child:
    """Start ``python -m module FD`` with the other end of a new socket pair as ``FD``;
    returns the process and this end as a stream. The child's interpreter starts while
    the caller goes on. It runs at the calling thread's priority, or at ``nice`` when
    given and no higher than the caller's (a lower priority is always allowed)."""
    parent, child = socket.socketpair()
    try:
        with child:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", module, str(child.fileno()),
                pass_fds=(child.fileno(),), stdin=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
        if nice is not None and nice >= os.getpriority(os.PRIO_PROCESS, 0):
            with contextlib.suppress(ProcessLookupError):  # gone already: its end says so
                os.setpriority(os.PRIO_PROCESS, process.pid, nice)
        reader, writer = await asyncio.open_connection(sock=parent)
    except BaseException:
        parent.close()  # the child, if started, reads the end and exits
        raise
    return process, reader, writer


async def end(
    writer: asyncio.StreamWriter | None, process: asyncio.subprocess.Process | None, what: str
) -> None:
    """Send what is still buffered for the child, close its socket and wait for it to
    exit; one that stops reading or does not exit within ``STOP_TIMEOUT`` is cut off or
    killed (``what`` names it in the log)."""
    if writer is not None:
        try:
            if not writer.is_closing():
                await asyncio.wait_for(writer.drain(), STOP_TIMEOUT)
        except (ConnectionError, TimeoutError):
            writer.transport.abort()  # a child that stopped reading: no more waiting
        finally:
            writer.close()  # even when cancelled: the child must see the end of its socket
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    if process is not None and process.returncode is None:
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
        except TimeoutError:
            log.error("the %s process did not exit: killing it", what)
            process.kill()
            await process.wait()
