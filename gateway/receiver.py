"""Receiving usage reports in a process of its own.

One CPython process has one GIL, and paho's Python (reading packets, building messages,
acknowledging) held it for about a quarter of the gateway's GIL-held time while the
charging, committing and publishing wanted it too (docs/performance.md). So the gateway
receives in a child process, ``python -m gateway.receiver``, with its own GIL:

    broker ══MQTT══▶ receiver process (MqttClient: persistent session, manual acks)
        ══socket pair, msgpack frames══▶ gateway: inbox ▶ verify ▶ charge ▶ commit
        ◀══ acknowledgements, after each commit ══

The receiver owns the subscription and the gateway's persistent session (its client
id); the gateway publishes on a connection of its own. It also checks each report's
signature (:func:`gateway.ingest.vouching_key`, on threads of its own: the C call
releases the GIL, and in the gateway each thread then queued for the GIL behind the
charging) against the devices' public keys (kept compactly: gateway.keytable), and
passes on the key it verified with (``vouched_by``): the gateway skips that check when
it is the device's key. Anything it cannot vouch for (an unknown
device, a bad envelope or signature) the gateway verifies in full, as before.

The keys: with a SQLite ledger the receiver reads them from the ledger file itself
(:func:`gateway.sqlite_ledger.public_keys_in`, a read-only connection), as soon as it
starts, on its own core while the gateway loads the rest of the ledger: sent over the
socket, 100,000 keys held the gateway's start-up up for 0.7 s (docs/performance.md).
Otherwise (an in-memory ledger) the gateway sends them. Either way each device
provisioned later is sent once it is committed; a device's key never changes.

The receiver never acknowledges a report by itself: only when the gateway tells it to,
after the report's batch is committed. So nothing changes for the
acknowledgement-after-commit rule:

- the gateway dies: the receiver reads the end of the socket, sends the
  acknowledgements it was given, disconnects and exits; the broker keeps the rest for
  the next run;
- the receiver dies: the gateway starts another (same client id, same session); the
  broker redelivers what was not acknowledged, and acknowledgements for messages of the
  dead one are dropped (their ids mean nothing on the new connection); redelivered
  reports debit nothing twice (the charging rule).

Frames (gateway.frames) are a 4-byte big-endian length, then a msgpack value:

- gateway → receiver: first the settings (a map, sent as the process starts; its
  ``keys_db`` names the ledger file to read every key from, or is None), then, when
  there is no ``keys_db``, every device's public key in frames of ``["keys", [[device,
  public key], ...]]``, then ``["connect", timeout in seconds]``; from then on
  ``["ack", [[connection, mid, qos], ...]]``, and ``["keys", ...]`` for each new device;
- receiver → gateway: ``["ready"]`` or ``["error", text]`` once, after the first
  connect; then batches of messages, each a list of
  ``[topic, payload, mid, qos, retain, connection, vouched_by]``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import signal
import socket
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from gateway import children
from gateway.errors import BrokerError, LedgerError
from gateway.frames import frame, read_frame
from gateway.ingest import vouching_key
from gateway.keytable import KeyTable
from gateway.mqtt import BrokerUrl, Incoming, MqttClient
from gateway.runtime import quiet_collector
from gateway.sqlite_ledger import public_keys_in
from gateway.topics import Topics
from gateway.workers import Workers

log = logging.getLogger("tokenwell.gateway")
MAX_FORWARDED = 1000  # messages in one frame at most
# Batches being vouched for at once. With one, a batch was split between the two threads,
# and the thread done first, then both while the frame was sent, had nothing to do: 5.6
# to 12.7 % of the machine idle in drains, 17,205-19,016 /s; with two, 4.3-9.2 % and
# 17,669-19,036 /s (eleven alternated pairs, docs/performance.md).
VOUCH_AHEAD = 2
# Batches up to this size are checked on the loop, not on threads. A batch handed to the
# two threads costs GIL hand-overs and wake-ups (futexes) between three threads; below
# this size one core keeps up anyway, and a backlog (the drain) still goes to threads.
# 8 before: at 4,400 reports/s (half load on machine B), eight alternated pairs, report
# -> control p99 median 97 -> 57 ms, the receiver 0.05-0.1 cores and 1,500 context
# switches a second less (docs/performance.md).
INLINE_VOUCH = 64
KEYS_PER_FRAME = 4096  # keys sent at start in frames of this many: no 10 MB frame at once
GENERATION = 1 << 32  # Incoming.session = generation * GENERATION + the receiver's connection
RESTART_DELAYS = (0.1, 0.5, 1.0, 2.0, 5.0)  # between attempts to replace a dead receiver
STABLE_SECONDS = 30.0  # receivers dying sooner after starting are replaced ever more slowly
# The GIL's switch interval here. A verifying thread wants the GIL back after each
# signature (about 100 us of C), and waits up to this long behind the event loop
# (paho's reading). Measured with paho still on a thread of its own (bench drain, two
# rounds each): 0.1 ms 5,207-6,032/s at 308-324 us of CPU a report (switching costs),
# 1 ms 5,999-6,578/s at 258-276 us, 5 ms (Python's) 5,704-5,972/s.
SWITCH_INTERVAL = 0.001


# --- the gateway's side ------------------------------------------------------------------


class Receiver:
    """A receiver process delivering the messages of ``topic_filter`` into ``inbox``.

    :meth:`start` spawns it and waits for its first connection; :meth:`run` delivers
    until :meth:`close`, replacing the process if it dies; :meth:`ack` acknowledges a
    delivered message (on the connection it came by, if that still exists).
    """

    def __init__(
        self,
        broker: str,
        client_id: str,
        topic_prefix: str,
        inbox: asyncio.Queue[Incoming],
        keys: Callable[[], Iterable[tuple[str, bytes]]],
        *,
        max_unacknowledged: int,
        keys_db: Path | None = None,
        on_restart: Callable[[], None] | None = None,
        nice: int | None = None,
    ) -> None:
        self._nice = nice  # the process's nice value (None: the spawning thread's)
        self._settings = {
            "broker": broker,
            "client_id": client_id,
            "topic_prefix": topic_prefix,
            "max_unacknowledged": max_unacknowledged,
            "log_level": logging.getLogger().getEffectiveLevel(),
            "keys_db": None if keys_db is None else str(keys_db.resolve()),
        }
        # Every device's public key, read at each (re)start: by the receiver itself from
        # the ledger file keys_db, when given (kept in the ledger once committed), else
        # sent to it from here.
        self._keys = keys
        self._on_restart = on_restart
        self._inbox = inbox
        self._generation = 0
        self._process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._acks: list[tuple[int, int, int]] = []
        self._closing = False
        self._started_at = 0.0  # loop time of the last successful start
        self._quick_deaths = 0  # receivers in a row that died within STABLE_SECONDS
        self._closed = asyncio.Event()

    @property
    def pid(self) -> int | None:
        """The receiver process's id (None before :meth:`start`)."""
        return self._process.pid if self._process is not None else None

    async def spawn(self) -> None:
        """Start the receiver process without connecting it yet, and send it its
        settings: its interpreter starts, and reads the keys from ``keys_db`` when given,
        while the gateway loads its ledger. :meth:`start` does this when not done."""
        self._process, self._reader, self._writer = await children.spawn(
            "gateway.receiver", self._nice
        )
        self._writer.write(frame(self._settings))

    async def start(self, timeout: float = 10.0) -> None:
        """Spawn the receiver (unless :meth:`spawn` did), send it every key (unless it
        reads them itself) and wait until it is connected and subscribed.

        Raises :class:`BrokerError` (with the receiver's reason) if it cannot connect
        within ``timeout`` seconds.
        """
        if self._writer is None:
            await self.spawn()
        reader, writer = self._reader, self._writer
        if self._closing or reader is None or writer is None:  # close() came meanwhile
            await self._end_process()
            raise BrokerError("the receiver is being closed")
        self._acks.clear()  # any left are for a dead receiver's connection numbers
        self._generation += 1
        try:
            # Keys included: a receiver that hung would otherwise stall this for ever (its
            # own connect timeout comes first).
            async with asyncio.timeout(timeout + children.STOP_TIMEOUT):
                if self._settings["keys_db"] is None:
                    await self._send_keys(writer)
                if not writer.is_closing():  # close() may have closed it meanwhile
                    writer.write(frame(["connect", timeout]))
                answer = await read_frame(reader)
        except TimeoutError:
            answer = ["error", f"the receiver did not connect within {timeout:g} s"]
        if answer != ["ready"]:
            await self._end_process()
            reason = answer[1] if isinstance(answer, list) and len(answer) == 2 else None
            raise BrokerError(reason or "the receiver process exited before connecting")
        self._started_at = asyncio.get_running_loop().time()

    async def _send_keys(self, writer: asyncio.StreamWriter) -> None:
        keys = iter(self._keys())
        while chunk := [[device, key] for device, key in itertools.islice(keys, KEYS_PER_FRAME)]:
            if writer.is_closing():  # closed by close(), or the receiver died
                return
            writer.write(frame(["keys", chunk]))
            with contextlib.suppress(ConnectionError):  # a dead receiver: start() says why
                await writer.drain()

    async def run(self) -> None:
        """Deliver messages until :meth:`close`; replace the receiver whenever it dies."""
        while True:
            await self._deliver()
            if self._closing:
                return
            await self._end_process()
            await self._restart()

    async def _deliver(self) -> None:
        assert self._reader is not None
        base = self._generation * GENERATION
        inbox = self._inbox
        while (batch := await read_frame(self._reader)) is not None:
            for topic, payload, mid, qos, retain, connection, key in batch:
                inbox.put_nowait(Incoming(topic, payload, mid, qos, retain, base + connection, key))

    async def _restart(self) -> None:
        # Receivers that keep dying soon after starting are not restarted in a tight loop.
        quick = asyncio.get_running_loop().time() - self._started_at < STABLE_SECONDS
        self._quick_deaths = self._quick_deaths + 1 if quick else 0
        for attempt in itertools.count(max(0, self._quick_deaths - 1)):
            delay = RESTART_DELAYS[min(attempt, len(RESTART_DELAYS) - 1)]
            log.error("the receiver process stopped: starting another in %.1f s", delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), delay)
            if self._closing:
                return
            try:
                await self.start()
            except BrokerError as exc:
                log.error("the new receiver process could not connect: %s", exc)
            else:
                if self._on_restart is not None:
                    self._on_restart()
                return

    def ack(self, message: Incoming) -> None:
        """Acknowledge ``message`` (sent with the others of this turn of the loop).

        Dropped when the receiver it came from has died: the broker redelivers it to
        the next one.
        """
        generation, connection = divmod(message.session, GENERATION)
        if generation != self._generation:
            return
        if not self._acks:
            asyncio.get_running_loop().call_soon(self._send_acks)
        self._acks.append((connection, message.mid, message.qos))

    def _send_acks(self) -> None:
        acks, self._acks = self._acks, []
        self._send(["ack", acks])

    def add_key(self, device: str, public_key: bytes) -> None:
        """Tell the receiver a new device's key, so that it vouches for its reports.
        (A receiver started later has it anyway: it is sent every key at start.)"""
        self._send(["keys", [[device, public_key]]])

    def _send(self, value: object) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(frame(value))

    async def close(self) -> None:
        """Send the acknowledgements given so far, let the receiver disconnect and wait
        for it to exit (see gateway.children)."""
        self._closing = True
        self._closed.set()
        if self._acks:
            self._send_acks()
        await self._end_process()

    async def _end_process(self) -> None:
        writer, process = self._writer, self._process
        self._writer = None
        await children.end(writer, process, "receiver")


# --- the receiver process ----------------------------------------------------------------


async def serve(fd: int) -> int:
    """The receiver process: connect as the settings on socket ``fd`` say, forward what
    arrives, acknowledge what the gateway says, until the gateway closes the socket.
    Returns the exit status."""
    reader, writer = await asyncio.open_connection(sock=socket.socket(fileno=fd))
    settings = await read_frame(reader)
    if settings is None:
        return 1
    logging.basicConfig(
        level=settings["log_level"], format="%(asctime)s %(levelname)s receiver: %(message)s"
    )
    keys = _stored_keys(settings["keys_db"])
    while (command := await read_frame(reader)) is None or command[0] != "connect":
        if command is None:
            return 1
        _obey(command, None, keys)
    connect_timeout = command[1]
    inbox: asyncio.Queue[Incoming] = asyncio.Queue()
    mqtt = MqttClient(
        BrokerUrl.parse(settings["broker"]), settings["client_id"], persistent=True,
        manual_ack=True, inbox=inbox, max_unacknowledged=settings["max_unacknowledged"],
    )  # fmt: skip
    topics = Topics(settings["topic_prefix"])
    mqtt.subscribe(topics.all_usage, qos=1)
    try:
        await mqtt.connect(connect_timeout)
    except BrokerError as exc:
        writer.write(frame(["error", str(exc)]))
        await writer.drain()
        return 1
    writer.write(frame(["ready"]))
    forwarding = asyncio.create_task(_forward(inbox, writer, Vouching(topics, keys)))
    obeying = asyncio.create_task(_obey_all(reader, mqtt, keys))
    try:
        await asyncio.wait({forwarding, obeying}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        forwarding.cancel()
        obeying.cancel()
        await mqtt.disconnect()  # PUBACKs already queued go out before the DISCONNECT
    failure = forwarding.exception() if forwarding.done() and not forwarding.cancelled() else None
    if failure is not None and not isinstance(failure, ConnectionError):  # not a gone gateway
        # Exit, so that the gateway starts another receiver (the broker keeps the rest).
        log.error("forwarding failed: %r", failure)
        return 1
    return 0


def _stored_keys(keys_db: str | None) -> KeyTable:
    """The keys in the ledger file ``keys_db`` (none when None). What cannot be read is
    logged and left out: those devices' reports are then verified in full by the
    gateway, slower but the same."""
    keys = KeyTable()
    if keys_db is None:
        return keys
    try:
        for device, key in public_keys_in(Path(keys_db)):
            keys.add(device, key)
    except LedgerError as exc:
        log.error("cannot read the devices' keys, the gateway verifies their reports: %s", exc)
    return keys


async def _obey_all(reader: asyncio.StreamReader, mqtt: MqttClient, keys: KeyTable) -> None:
    """Carry out the gateway's commands until it closes the socket."""
    while (command := await read_frame(reader)) is not None:
        _obey(command, mqtt, keys)


def _obey(command: list[Any], mqtt: MqttClient | None, keys: KeyTable) -> None:
    kind, value = command
    if kind == "ack" and mqtt is not None:
        for connection, mid, qos in value:
            mqtt.acknowledge(mid, qos, connection)
    elif kind == "keys":
        for device, key in value:
            keys.add(device, key)


class Vouching:
    """Checks the signatures of a batch of messages on worker threads, in order."""

    def __init__(self, topics: Topics, keys: KeyTable) -> None:
        self._topics, self._keys = topics, keys
        self._workers = Workers("vouch")

    async def check(self, batch: list[Incoming]) -> list[bytes | None]:
        """For each message, the key its signature is valid with (:func:`vouching_key`)."""
        return await self._workers.map(self._check, batch, inline=INLINE_VOUCH)

    def start(self, batch: list[Incoming]) -> asyncio.Future[list[bytes | None]]:
        """:meth:`check` begun: on the threads, or for a small batch done here and now."""
        if len(batch) > INLINE_VOUCH:
            return asyncio.ensure_future(self.check(batch))
        done = asyncio.get_running_loop().create_future()
        done.set_result(self._check(batch))
        return done

    def _check(self, messages: Sequence[Incoming]) -> list[bytes | None]:
        device_of, keys = self._topics.device_of_usage, self._keys
        return [vouching_key(device_of(m.topic), m.payload, keys) for m in messages]


async def _forward(
    inbox: asyncio.Queue[Incoming], writer: asyncio.StreamWriter, vouching: Vouching
) -> None:
    """Send what arrives to the gateway, in order, as many messages a frame as are
    waiting. Up to ``VOUCH_AHEAD`` batches are vouched for at once: while one is being
    finished and sent, the threads already check the next."""
    vouched: collections.deque[tuple[list[Incoming], asyncio.Future[list[bytes | None]]]]
    vouched = collections.deque()
    try:
        while True:
            if not vouched:
                batch = _take(inbox, [await inbox.get()])
                vouched.append((batch, vouching.start(batch)))
            if len(vouched) < VOUCH_AHEAD and not inbox.empty():
                batch = _take(inbox, [])
                vouched.append((batch, vouching.start(batch)))
            batch, keys = vouched[0]
            rows = [
                (m.topic, m.payload, m.mid, m.qos, m.retain, m.session, key)
                for m, key in zip(batch, await keys, strict=True)
            ]
            vouched.popleft()
            writer.write(frame(rows))
            await writer.drain()
    finally:
        for _, keys in vouched:
            keys.cancel()


def _take(inbox: asyncio.Queue[Incoming], batch: list[Incoming]) -> list[Incoming]:
    """``batch`` with what is waiting in ``inbox`` added, up to ``MAX_FORWARDED``."""
    while not inbox.empty() and len(batch) < MAX_FORWARDED:
        batch.append(inbox.get_nowait())
    return batch


def main() -> int:
    # Ctrl-C and a service manager's SIGTERM reach the whole process group: the gateway
    # stops cleanly, and this process must stay until it has sent the gateway's last
    # acknowledgements, i.e. until the gateway closes the socket.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.setswitchinterval(SWITCH_INTERVAL)
    quiet_collector()
    return asyncio.run(serve(int(sys.argv[1])))


if __name__ == "__main__":
    sys.exit(main())
