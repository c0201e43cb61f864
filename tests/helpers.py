"""Test helpers: a real gateway (in-process or as a child process) and a raw MQTT device.

Waiting is always on the event itself (a message, a commit, a process line), with a
timeout, never a sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gateway.app import Gateway
from gateway.config import parse_settings
from gateway.ledger import Ledger, Snapshot
from gateway.mqtt import BrokerUrl, Incoming, MqttClient
from gateway.topics import Topics
from gateway.wire import (
    ControlMessage,
    UsageReport,
    decode_control,
    public_key_from_hex,
    public_key_hex,
    sign_usage,
)

TOKEN = "test-admin-token"
PRICES = {"api_calls": "0.01", "gpu_seconds": "1/3", "bytes_out": "1/1000"}


def unique_prefix() -> str:
    return f"test/{uuid.uuid4().hex[:12]}"


def may_raise_priority(levels: int) -> bool:
    """Whether this thread may run ``levels`` nice levels higher than it does (root alone
    is not enough in a container without ``CAP_SYS_NICE``; a user with a nice allowance
    may): tried, and put back. False too if that would pass the kernel's highest, -20."""
    now = os.getpriority(os.PRIO_PROCESS, 0)
    if now - levels < -20:
        return False
    try:
        os.setpriority(os.PRIO_PROCESS, 0, now - levels)
    except PermissionError:
        return False
    os.setpriority(os.PRIO_PROCESS, 0, now)
    return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class GatewayHandle:
    """A running in-process gateway and an authenticated API client for it."""

    gateway: Gateway
    api: httpx.AsyncClient
    topics: Topics
    key: Ed25519PublicKey

    @property
    def service(self) -> Any:
        return self.gateway.service

    async def add_device(
        self, device: str, key: Ed25519PrivateKey, tokens: int, **extra: Any
    ) -> dict[str, Any]:
        body = {"id": device, "public_key": public_key_hex(key), "tokens": tokens, **extra}
        reply = await self.api.post("/v1/devices", json=body)
        assert reply.status_code == 201, reply.text
        result: dict[str, Any] = reply.json()
        return result

    async def device(self, device: str) -> dict[str, Any]:
        reply = await self.api.get(f"/v1/devices/{device}")
        assert reply.status_code == 200, reply.text
        result: dict[str, Any] = reply.json()
        return result

    async def wait_committed(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until ``predicate()`` holds after some committed batch."""
        condition = self.gateway.service.committed
        async with asyncio.timeout(timeout), condition:
            await condition.wait_for(predicate)


@contextlib.asynccontextmanager
async def running_gateway(
    broker_url: str,
    data_dir: Path,
    *,
    prefix: str | None = None,
    meters: dict[str, str] | None = None,
    client_id: str | None = None,
    throttle: list[dict[str, str]] | None = None,
    ledger: Any = None,
) -> AsyncIterator[GatewayHandle]:
    """Run a real gateway (SQLite ledger in ``data_dir``) against the broker."""
    os.environ["TOKENWELL_TOKEN"] = TOKEN
    raw: dict[str, Any] = {
        "topic_prefix": prefix or unique_prefix(),
        "meters": PRICES if meters is None else meters,
        "broker": broker_url,
        "db": str(data_dir / "ledger.sqlite3"),
        "api": "127.0.0.1:0",
        "client_id": client_id or f"gw-{uuid.uuid4().hex[:8]}",
    }
    if throttle is not None:
        raw["throttle"] = throttle
    gateway = Gateway(parse_settings(raw), ledger=ledger)
    task = asyncio.create_task(gateway.run(), name="gateway")
    ready = asyncio.create_task(gateway.ready.wait())
    done, _ = await asyncio.wait({task, ready}, timeout=15, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        ready.cancel()
        task.result()  # raises why the gateway could not start
    assert ready in done, "gateway did not become ready"
    base = f"http://127.0.0.1:{gateway.api_port}"
    async with httpx.AsyncClient(
        base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}
    ) as api:
        try:
            key = public_key_from_hex((await api.get("/v1/gateway")).json()["public_key"])
        except httpx.ConnectError:
            if task.done():
                task.result()  # the gateway stopped: raise why
            raise
        try:
            yield GatewayHandle(gateway, api, Topics(raw["topic_prefix"]), key)
        finally:
            gateway.stop()
            await asyncio.wait_for(task, 15)


@dataclass
class RawDevice:
    """A hand-driven device: signs reports itself and collects its control messages."""

    id: str
    key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    boot: int = 1
    number: int = 0

    def report(
        self, counters: dict[str, int], *, boot: int | None = None, t: int = 1_800_000_000_000
    ) -> bytes:
        self.number += 1
        report = UsageReport(self.id, self.boot if boot is None else boot, self.number, t, counters)
        return sign_usage(report, self.key)


class Listener:
    """An MQTT subscriber collecting messages by topic, with event-driven waits."""

    def __init__(self, client: MqttClient, inbox: asyncio.Queue[Incoming]) -> None:
        self.client = client
        self._inbox = inbox
        self.messages: list[Incoming] = []

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, broker_url: str, *filters: str) -> AsyncIterator[Listener]:
        inbox: asyncio.Queue[Incoming] = asyncio.Queue()
        client = MqttClient(
            BrokerUrl.parse(broker_url), f"listener-{uuid.uuid4().hex[:8]}", inbox=inbox
        )
        for topic_filter in filters:
            client.subscribe(topic_filter)
        await client.connect()
        try:
            yield cls(client, inbox)
        finally:
            await client.disconnect()

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1)

    async def wait_for(
        self, predicate: Callable[[Incoming], bool], timeout: float = 10.0
    ) -> Incoming:
        """The first message (seen before or arriving now) satisfying ``predicate``."""
        for message in self.messages:
            if predicate(message):
                return message
        async with asyncio.timeout(timeout):
            while True:
                message = await self._inbox.get()
                self.messages.append(message)
                if predicate(message):
                    return message

    async def wait_control(
        self, topics: Topics, device: str, key: Ed25519PublicKey,
        predicate: Callable[[ControlMessage], bool], timeout: float = 10.0,
    ) -> ControlMessage:  # fmt: skip
        """The first verified control message for ``device`` satisfying ``predicate``."""

        def matches(message: Incoming) -> bool:
            if message.topic != topics.control(device):
                return False
            control = decode_control(message.payload, key)
            return isinstance(control, ControlMessage) and predicate(control)

        found = await self.wait_for(matches, timeout)
        control = decode_control(found.payload, key)
        assert isinstance(control, ControlMessage)
        return control


STARTED: list[subprocess.Popen[bytes]] = []  # killed after each test (conftest), pass or fail


def kill_leftovers(since: int = 0) -> None:
    """Kill the gateway processes started after the first ``since`` that are still running."""
    while len(STARTED) > since:
        process = STARTED.pop()
        if process.poll() is None:
            process.kill()
            process.wait(10)


@dataclass
class GatewayProcess:
    """``tokenwell gateway`` as a child process, for kill -9 tests."""

    args: list[str]
    env: dict[str, str]
    api_port: int
    process: subprocess.Popen[bytes] | None = None

    @classmethod
    def prepare(
        cls, broker_url: str, data_dir: Path, config: str, port: int | None = None
    ) -> GatewayProcess:
        config_path = data_dir / "gateway.toml"
        config_path.write_text(config)
        port = port or free_port()
        args = [sys.executable, "-m", "gateway.cli", "gateway", "--broker", broker_url,
                "--db", str(data_dir / "ledger.sqlite3"), "--api", f"127.0.0.1:{port}",
                "--config", str(config_path)]  # fmt: skip
        env = {**os.environ, "TOKENWELL_TOKEN": TOKEN}
        return cls(args, env, port)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def start(self) -> None:
        self.process = subprocess.Popen(self.args, env=self.env, stderr=subprocess.PIPE)
        STARTED.append(self.process)
        assert self.process.stderr is not None
        for line in iter(self.process.stderr.readline, b""):  # waits on the ready line itself
            if b"gateway ready" in line:
                break
        else:
            raise AssertionError(f"gateway exited with {self.process.wait()}")
        self._drain = _drain_in_background(self.process)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    def terminate(self) -> int:
        assert self.process is not None
        self.process.terminate()
        return self.process.wait(20)


def _drain_in_background(process: subprocess.Popen[bytes]) -> Iterator[None] | None:
    import threading

    def drain() -> None:
        assert process.stderr is not None
        for _ in iter(process.stderr.readline, b""):
            pass

    threading.Thread(target=drain, daemon=True).start()
    return None


async def assert_conserved(ledger: Ledger) -> Snapshot:
    """Every pool's balance equals its ledger entries (grants + settles - forfeits -
    debits), and, while no period has reset it, its ``used`` is the sum of its debits;
    every device's ``used`` is the sum of its own debits in the pool's current period.
    Returns the snapshot checked."""
    snapshot = await ledger.load()
    for pool in snapshot.pools:
        credits, debits = await ledger.totals(pool.key)
        assert credits - debits == pool.balance, pool
        if pool.period is None:
            assert debits == pool.used, pool
    return snapshot
