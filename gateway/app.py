"""The composition root: builds settings, adapters and the service, and runs them.

The only place that reads the real clock, handles signals, or knows which concrete
ledger, MQTT client and web server are used. Background work runs in one
``asyncio.TaskGroup`` with named tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.api import build_api
from gateway.config import Settings
from gateway.errors import ConfigError
from gateway.ingest import Pricing
from gateway.ledger import Ledger
from gateway.metrics import Metrics
from gateway.mqtt import BrokerUrl, MqttClient
from gateway.receiver import Receiver
from gateway.runtime import LOOP_BOOST, quiet_collector, raised_priority
from gateway.service import MeteringService
from gateway.sqlite_ledger import SqliteLedger
from gateway.topics import Topics
from gateway.wire import public_key_hex

log = logging.getLogger("tokenwell.gateway")
FLEET_STATE_INTERVAL = 0.5  # seconds: operator topics follow a change within a second
# Reports held unacknowledged at most (the receiver stops reading beyond): above the
# broker's in-flight window (5,000, broker/mosquitto.conf), which Mosquitto 2.0 does not
# always keep to.
MAX_UNACKNOWLEDGED = 6000
# The GIL's switch interval: how long a thread that released the GIL (a socket read, an
# OpenSSL verification, a read of the ledger) may wait to get it back from a busy one.
# Python's 5 ms made every statement of a commit wait 5 ms behind paho's and the verify
# threads' Python, when commits still ran in this process (now: gateway.writer).
GIL_SWITCH_INTERVAL = 0.001
FLEET_STATE_SLICE = 25  # retained messages published at once; slices spread over the interval


def publisher_client_id(client_id: str) -> str:
    """The client id the gateway publishes under; ``client_id`` itself, with the
    persistent session, is the receiver's (gateway.receiver)."""
    return f"{client_id}-out"


def wall_clock_ms() -> int:
    """The real clock, in ms since the Unix epoch."""
    return time.time_ns() // 1_000_000


def token_path(db: Path) -> Path:
    """Where the admin token is kept when ``TOKENWELL_TOKEN`` is not set: beside the ledger."""
    return db.with_name(db.name + ".token")


def admin_token(db: Path, environ: dict[str, str] | os._Environ[str] = os.environ) -> str:
    """``$TOKENWELL_TOKEN``, else the token file beside the ledger, made on first start."""
    if token := environ.get("TOKENWELL_TOKEN"):
        return token
    path = token_path(db)
    if path.exists():
        return path.read_text(encoding="utf-8").strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(token + "\n")
    log.info("made an admin token, kept in %s", path)
    return token


async def signing_key(ledger: Ledger) -> Ed25519PrivateKey:
    """The gateway's Ed25519 key, kept in the ledger; made on first start."""
    raw = await ledger.get_meta("gateway_signing_key")
    if raw is None:
        key = Ed25519PrivateKey.generate()
        await ledger.set_meta("gateway_signing_key", key.private_bytes_raw())
        return key
    return Ed25519PrivateKey.from_private_bytes(raw)


@dataclass
class Gateway:
    """A running gateway. ``ready`` is set once it serves MQTT and HTTP."""

    settings: Settings
    ledger: Ledger | None = None
    clock: object = wall_clock_ms
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    api_port: int = 0
    service: MeteringService | None = None
    receiver: Receiver | None = None
    _connections: int = 0

    async def run(self) -> None:
        """Serve until :meth:`stop` (or a signal, via :func:`serve`); then stop cleanly.

        The event loop runs ``LOOP_BOOST`` nice levels above the priority it was started
        with, where allowed, and the ledger's writer (started now) above it; the receiver
        runs at the priority the gateway was started with (gateway.runtime).
        """
        with raised_priority(LOOP_BOOST) as started_nice:
            ledger = self.ledger or SqliteLedger(self.settings.db)
            await ledger.open()
            try:
                await self._run_with(ledger, started_nice)
            finally:
                await ledger.close()

    async def _run_with(self, ledger: Ledger, receiver_nice: int) -> None:
        settings = self.settings
        key = await signing_key(ledger)
        token = admin_token(settings.db)
        pricing = Pricing(
            settings.meters, settings.throttle, settings.device_clock_max_age_s * 1000
        )
        clock = self.clock if callable(self.clock) else wall_clock_ms
        service = MeteringService(
            ledger, pricing, Topics(settings.topic_prefix), key, clock, Metrics(),
            flood_limit=settings.max_reports_per_second,
        )  # fmt: skip
        self.service = service
        receiver = Receiver(
            settings.broker, settings.client_id, settings.topic_prefix, service.inbox,
            service.public_keys, max_unacknowledged=MAX_UNACKNOWLEDGED,
            keys_db=ledger.path if isinstance(ledger, SqliteLedger) else None,
            on_restart=service.metrics.receiver_restarts.inc, nice=receiver_nice,
        )  # fmt: skip
        await receiver.spawn()  # it starts, and reads the keys, while the ledger loads
        try:
            await service.load()
            sock = _bind(*settings.api_host_port)
        except BaseException:
            await receiver.close()
            raise
        self.api_port = sock.getsockname()[1]
        try:
            mqtt = await self._connect(service, receiver)
        except BaseException:
            sock.close()
            raise
        service.attach(mqtt, receiver)
        self.receiver = receiver
        server = uvicorn.Server(
            uvicorn.Config(
                build_api(service, token, public_key_hex(key)),
                log_level="warning",
                lifespan="off",
            )
        )
        try:
            async with asyncio.TaskGroup() as tasks:
                receiving = tasks.create_task(receiver.run(), name="receiver")
                tasks.create_task(service.verify_stage(self.stopping), name="verify")
                tasks.create_task(service.charge_stage(), name="charge")
                committing = tasks.create_task(service.commit_stage(self.stopping), name="commit")
                tasks.create_task(self._fleet_state(service), name="fleet-state")
                tasks.create_task(server.serve(sockets=[sock]), name="admin-api")
                tasks.create_task(self._announce_ready(server), name="ready")
                await committing  # ends once stopping is set and in-flight work is committed
                server.should_exit = True
                self.stopping.set()
                await receiver.close()  # after the last acknowledgement
                await receiving
        finally:
            # A cancelled uvicorn never runs its shutdown: close its listener through
            # asyncio, which also drops the loop's reader for the socket. Closing only the
            # socket would leave that reader on a file descriptor number the next socket
            # reuses (seen as refused connections in the next gateway in this process).
            for listener in server.servers:
                listener.close()
            await receiver.close()
            service.flush_fleet_state(limit=1_000_000)
            await mqtt.disconnect()
            service.close()
            sock.close()

    async def _connect(self, service: MeteringService, receiver: Receiver) -> MqttClient:
        """Connect the publishing client, then the receiver (which holds the persistent
        session). Raises :class:`BrokerError` (or :class:`ConfigError` for a bad broker
        URL), with nothing left open: the receiver is closed on any failure."""
        settings = self.settings
        try:
            mqtt = MqttClient(
                BrokerUrl.parse(settings.broker),
                publisher_client_id(settings.client_id),
                on_published=service.control_published,
                on_connect=self._connected,
            )
            await mqtt.connect()  # on failure, it has disconnected
        except BaseException:
            await receiver.close()
            raise
        try:
            await receiver.start()  # on failure, its process has ended
        except BaseException:
            await mqtt.disconnect()
            await receiver.close()
            raise
        return mqtt

    def _connected(self) -> None:
        """Each (re)connect to the broker; all but the first re-publish retained state."""
        self._connections += 1
        if self._connections > 1 and self.service is not None:
            log.warning("reconnected to the broker: re-publishing retained state")
            self.service.reconnected()

    async def _announce_ready(self, server: uvicorn.Server) -> None:
        """Once the admin API serves (uvicorn has no event for it: poll its flag, 10 s at
        most), log the ready line and set :attr:`ready`."""
        for _ in range(1000):
            if server.started:
                break
            await asyncio.sleep(0.01)
        else:
            raise ConfigError("the admin API did not start within 10 s")
        host = self.settings.api_host_port[0]
        log.info(
            "tokenwell gateway ready: broker %s, ledger %s, admin API http://%s:%d",
            BrokerUrl.parse(self.settings.broker), self.settings.db, host, self.api_port,
        )  # fmt: skip
        self.ready.set()

    async def _fleet_state(self, service: MeteringService) -> None:
        """Apply the passing of time (expiries, period resets), then publish what is due,
        every interval, in small slices spread evenly over the interval.

        Spread, not in one burst: with a busy fleet nearly every device changes every
        interval, and publishing 1,300 states at once held reports (and their control
        messages) up for 100 ms every half second.
        """
        loop = asyncio.get_running_loop()
        while not self.stopping.is_set():
            tick = loop.time()
            await service.pass_time()  # grant expiries and period resets due by now
            slices = max(1, -(-service.fleet_state_due // FLEET_STATE_SLICE))
            for index in range(slices):
                if service.flush_fleet_state(limit=FLEET_STATE_SLICE) == 0:
                    break
                await self._pause(tick + FLEET_STATE_INTERVAL * (index + 1) / slices - loop.time())
            await self._pause(tick + FLEET_STATE_INTERVAL - loop.time())

    async def _pause(self, seconds: float) -> None:
        """Wait ``seconds`` (at least one turn of the loop), or until stopping."""
        if seconds <= 0.001:
            await asyncio.sleep(0)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)

    def stop(self) -> None:
        """Ask the gateway to finish in-flight work and stop."""
        self.stopping.set()


def _bind(host: str, port: int) -> socket.socket:
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        raise ConfigError(f"api: cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


async def serve(settings: Settings) -> None:
    """Run a gateway until SIGINT or SIGTERM, then stop cleanly."""
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    quiet_collector()
    gateway = Gateway(settings)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, gateway.stop)
    await gateway.run()
    log.info("tokenwell gateway stopped cleanly: in-flight reports committed and acknowledged")
