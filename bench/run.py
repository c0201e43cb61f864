"""Tokenwell's benchmark: drain rate against its floors, latency, memory and start-up.

    python -m bench [--devices 1000] [--reports 30000] [--memory-devices 100000] [--quick]

Everything is real: a Mosquitto from ``broker/`` on a free port, the gateway as its own
process (``tokenwell gateway``, SQLite ledger, acknowledgement after commit), reports
signed with Ed25519 ahead of time. Phases, all on the same pre-signed messages:

1. **verify floor**: decode and verify every report on one thread, then on all cores;
2. **receive floor**: a bare paho subscriber (MQTT 3.1.1, QoS 1, persistent session,
   automatic acknowledgement, a callback that only counts) drains the backlog;
3. **gateway drain**: the same backlog, queued for the gateway's persistent session
   while it is down, drained to committed charges: reports a second, CPU per report,
   and the ratio to the ceiling ``1 / (1/receive + 1/verify_all_cores)``;
4. **latency** at half the drain rate: publication to the signed ``block`` control
   message of a device whose report exhausts its allocation (charge, commit, control);
5. **memory and start-up** with ``--memory-devices`` provisioned devices that have all
   reported once: start-up to ready, resident memory per device over an empty gateway.

Results go to a JSON file and a table; ``docs/performance.md`` keeps them over time.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as paho
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion

from gateway.ledger import Grant, LedgerWrite
from gateway.metering import Device
from gateway.mqtt import BrokerUrl, MqttClient
from gateway.sqlite_ledger import SqliteLedger
from gateway.wire import USAGE_DOMAIN, UsageReport, decode_envelope, sign_usage

PREFIX = "bench/v1"
TOKEN = "bench-token"
T0 = 1_795_000_000_000


@dataclass
class Results:
    """Everything one run measured."""

    machine: dict[str, Any] = field(default_factory=dict)
    devices: int = 0
    reports: int = 0
    verify_one_core: float = 0.0
    verify_all_cores: float = 0.0
    receive_floor: float = 0.0
    ceiling: float = 0.0
    drain_rate: float = 0.0
    drain_ratio: float = 0.0
    drain_cpu_us_per_report: float = 0.0
    latency_offered_rate: float = 0.0
    latency_samples: int = 0
    latency_p50_ms: float = 0.0
    latency_p99_ms: float = 0.0
    latency_max_ms: float = 0.0
    memory_devices: int = 0
    startup_s: float = 0.0
    rss_baseline_mib: float = 0.0
    rss_total_mib: float = 0.0
    rss_bytes_per_device: float = 0.0


# --- inputs -------------------------------------------------------------------------------


def device_key(index: int) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(f"bench/{index}".encode()).digest())


def sign_backlog(
    devices: int, reports: int, prefix: str = "dev", first_n: int = 1
) -> list[tuple[str, bytes]]:
    """``reports`` signed reports, round robin over ``devices``, counters increasing
    (from report number ``first_n``, so a later backlog charges again)."""
    keys = [device_key(i) for i in range(devices)]
    backlog = []
    for j in range(reports):
        i = j % devices
        device = f"{prefix}-{i:06d}"
        n = first_n + j // devices
        report = UsageReport(device, 1, n, T0, {"api_calls": n * 100})
        backlog.append((device, sign_usage(report, keys[i])))
    return backlog


async def write_ledger(path: Path, devices: int, tokens: int, prefix: str = "dev") -> None:
    """Provision devices straight into a ledger (the API would take minutes for 100,000)."""
    ledger = SqliteLedger(path)
    await ledger.open()
    try:
        rows = [
            Device(
                f"{prefix}-{i:06d}",
                device_key(i).public_key().public_bytes_raw(),
                "bench",
                tokens,
                0,
                T0,
                T0,
            )
            for i in range(devices)
        ]
        grants = [Grant(d.id, "bench", tokens, "initial", T0) for d in rows]
        await ledger.commit(LedgerWrite(devices=rows, grants=grants))
    finally:
        await ledger.close()


# --- floors -------------------------------------------------------------------------------


def _verify_chunk(chunk: list[tuple[str, bytes]], keys: dict[str, Any]) -> int:
    ok = 0
    for device, payload in chunk:
        envelope = decode_envelope(payload)
        assert not isinstance(envelope, Exception)
        key = keys[device]
        ok += envelope.verify(USAGE_DOMAIN, key)  # type: ignore[union-attr]
    return ok


def verify_rates(backlog: list[tuple[str, bytes]], devices: int) -> tuple[float, float]:
    """Reports a second verified on one thread, and on ``os.cpu_count()`` threads."""
    keys = {f"dev-{i:06d}": device_key(i).public_key() for i in range(devices)}
    start = time.perf_counter()
    assert _verify_chunk(backlog, keys) == len(backlog)
    one = len(backlog) / (time.perf_counter() - start)
    workers = os.cpu_count() or 1
    step = -(-len(backlog) // workers)
    chunks = [backlog[i : i + step] for i in range(0, len(backlog), step)]
    with ThreadPoolExecutor(workers) as pool:
        start = time.perf_counter()
        assert sum(pool.map(_verify_chunk, chunks, [keys] * len(chunks))) == len(backlog)
        many = len(backlog) / (time.perf_counter() - start)
    return one, many


async def publish_backlog(url: str, backlog: list[tuple[str, bytes]]) -> None:
    publisher = MqttClient(BrokerUrl.parse(url), f"bench-pub-{os.getpid()}")
    await publisher.connect()
    for index, (device, payload) in enumerate(backlog):
        publisher.publish(f"{PREFIX}/devices/{device}/usage", payload)
        if index % 5000 == 4999:
            await publisher.flush(120)
    await publisher.flush(120)
    await publisher.disconnect()


async def register_session(url: str, client_id: str) -> None:
    """Create a persistent session subscribed to every usage topic, so the broker queues."""
    client = MqttClient(
        BrokerUrl.parse(url), client_id, persistent=True, manual_ack=True, inbox=asyncio.Queue()
    )
    client.subscribe(f"{PREFIX}/devices/+/usage")
    await client.connect()
    await client.disconnect()


def bare_receive(url: str, client_id: str, expected: int, timeout: float = 300) -> float:
    """A plain paho subscriber draining ``expected`` queued messages; reports a second."""
    address = BrokerUrl.parse(url)
    done, count, started = threading.Event(), [0], [0.0]

    def on_message(client: Any, userdata: Any, message: Any) -> None:
        if count[0] == 0:
            started[0] = time.perf_counter()
        count[0] += 1
        if count[0] >= expected:
            done.set()

    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=False,
        protocol=paho.MQTTv311,
    )
    client.on_message = on_message
    client.connect(address.host, address.port)
    client.loop_start()
    if not done.wait(timeout):
        raise RuntimeError(f"bare subscriber received {count[0]} of {expected}")
    elapsed = time.perf_counter() - started[0]
    client.disconnect()
    client.loop_stop()
    return expected / elapsed


# --- the gateway as a process ---------------------------------------------------------------


@dataclass
class GatewayProcess:
    process: subprocess.Popen[bytes]
    api: str
    startup_s: float

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def processed(self) -> int:
        text = httpx.get(f"{self.api}/metrics", timeout=10).text
        return int(
            sum(
                float(line.split()[-1])
                for line in text.splitlines()
                if line.startswith("tokenwell_reports_total{")
            )
        )

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)


@contextmanager
def gateway(url: str, folder: Path, port: int) -> Iterator[GatewayProcess]:
    config = folder / "gateway.toml"
    config.write_text(
        f'topic_prefix = "{PREFIX}"\nclient_id = "bench-gateway"\n[meters]\napi_calls = "0.01"\n'
    )
    ledger = str(folder / "ledger.sqlite3")
    command = [
        *(sys.executable, "-m", "gateway.cli", "gateway", "--broker", url, "--db", ledger),
        *("--api", f"127.0.0.1:{port}", "--config", str(config), "--log-level", "WARNING"),
    ]
    env = {**os.environ, "TOKENWELL_TOKEN": TOKEN}
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE)
    handle = GatewayProcess(process, f"http://127.0.0.1:{port}", 0.0)
    try:
        _wait_ready(handle)
        handle.startup_s = time.perf_counter() - started
        yield handle
    finally:
        if process.poll() is None:
            handle.stop()


def _wait_ready(handle: GatewayProcess, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if handle.process.poll() is not None:
            raise RuntimeError(f"gateway exited: {handle.process.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
        try:
            if httpx.get(f"{handle.api}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.02)
    raise RuntimeError("gateway not ready")


def wait_processed(handle: GatewayProcess, expected: int, timeout: float = 600) -> float:
    """Poll /metrics (every 20 ms) until ``expected`` reports are committed; returns when."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if handle.processed() >= expected:
            return time.perf_counter()
        time.sleep(0.02)
    raise RuntimeError(f"gateway committed {handle.processed()} of {expected}")


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
