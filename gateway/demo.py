"""``tokenwell demo``: a broker, the gateway, a simulated fleet and a live view, in one command.

Everything is real: a Mosquitto started on a free port with ``broker/mosquitto.conf``,
the gateway with its SQLite ledger in a folder, devices provisioned through the admin API,
simulated devices signing reports and obeying control messages, and a live table built
from the operator topics. Devices slow down as their allocation runs low and stop at zero;
with auto-refill on, the demo refills a device that stayed blocked for a while, through
the admin API, and prints the equivalent CLI command.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from types import MappingProxyType

import httpx

from broker import start_broker
from device_sim.device import make_devices
from device_sim.fleet import Fleet
from gateway.app import Gateway, admin_token
from gateway.config import Settings
from gateway.mqtt import BrokerUrl, Incoming, MqttClient
from gateway.topics import Topics
from gateway.watch import FleetView
from gateway.wire import public_key_from_hex, public_key_hex

PRICES = MappingProxyType({"api_calls": Fraction(1, 100), "gpu_seconds": Fraction(1, 3)})
RATES = {"api_calls": 120, "gpu_seconds": 2}  # per second, scaled 0.5x to 2x per device
ALLOCATIONS = (30, 60, 120, 250, 500, 1000)
REFILL_AFTER_S = 10.0


@contextlib.contextmanager
def _folder(given: Path | None) -> Iterator[Path]:
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield given
        return
    with tempfile.TemporaryDirectory(prefix="tokenwell-demo-") as temp:
        yield Path(temp)


def _api_address() -> str:
    """127.0.0.1:8080 when free (the documented default), else any free port."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", 8080))
        except OSError:
            return "127.0.0.1:0"
    return "127.0.0.1:8080"


async def run_demo(
    devices: int, folder: Path | None, duration: float | None, auto_refill: bool
) -> None:
    """Run the demo until Ctrl-C or ``duration`` seconds."""
    with _folder(folder) as home, start_broker(home / "broker") as broker:
        settings = Settings(
            meters=PRICES, broker=broker.url, db=home / "ledger.sqlite3", api=_api_address()
        )
        gateway = Gateway(settings)
        gateway_task = asyncio.create_task(gateway.run(), name="gateway")
        await _until_ready(gateway, gateway_task)
        api_url = f"http://127.0.0.1:{gateway.api_port}"
        token = admin_token(settings.db)
        try:
            await _demo(devices, home, broker.url, api_url, token, duration, auto_refill)
        finally:
            gateway.stop()
            await gateway_task


async def _until_ready(gateway: Gateway, task: asyncio.Task[None]) -> None:
    ready = asyncio.create_task(gateway.ready.wait())
    await asyncio.wait({ready, task}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        ready.cancel()
        task.result()


async def _demo(
    count: int, home: Path, broker_url: str, api_url: str, token: str,
    duration: float | None, auto_refill: bool,
) -> None:  # fmt: skip
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=api_url, headers=headers) as api:
        gateway_key = public_key_from_hex((await api.get("/v1/gateway")).json()["public_key"])
        simulated = make_devices(count, seed=7, rates=RATES, id_prefix="demo")
        for index, device in enumerate(simulated):
            body = {
                "id": device.device_id,
                "public_key": public_key_hex(device.public_key),
                "tokens": ALLOCATIONS[index % len(ALLOCATIONS)],
                "account": f"customer-{index % 3 + 1}",
            }
            reply = await api.post("/v1/devices", json=body)
            if reply.status_code not in (201, 409):  # 409: a re-run on the same --dir
                raise RuntimeError(f"provisioning failed: {reply.text}")
        fleet = Fleet.create(
            simulated, BrokerUrl.parse(broker_url), gateway_key, store_path=home / "fleet.json"
        )
        await fleet.start()
        header = _header(home, broker_url, api_url, token)
        try:
            async with asyncio.TaskGroup() as tasks:
                sim = tasks.create_task(fleet.run(interval=1.0, duration=duration), name="fleet")
                view = tasks.create_task(
                    _live_view(broker_url, api, header, auto_refill), name="view"
                )
                await sim
                view.cancel()
        finally:
            await fleet.stop()


def _tokenwell_command() -> str:
    """``tokenwell`` when it is on PATH, else its path beside this Python (the venv)."""
    if shutil.which("tokenwell"):
        return "tokenwell"
    beside = Path(sys.executable).with_name("tokenwell")
    return str(beside) if beside.exists() else "tokenwell"


def _header(home: Path, broker_url: str, api_url: str, token: str) -> str:
    env = f"TOKENWELL_API={api_url} TOKENWELL_TOKEN={token} {_tokenwell_command()}"
    return "\n".join([
        "Tokenwell demo — Ctrl-C to stop",
        f"  broker {broker_url}   admin API {api_url}   ledger {home / 'ledger.sqlite3'}",
        f"  admin token: {token}",
        f"  try:  {env} refill demo-0000 200",
        f"        {env} usage --bucket hour",
        f"        {_tokenwell_command()} watch --broker {broker_url}",
        "",
    ])  # fmt: skip


async def _live_view(
    broker_url: str, api: httpx.AsyncClient, header: str, auto_refill: bool
) -> None:
    view = FleetView(Topics())
    inbox: asyncio.Queue[Incoming] = asyncio.Queue()
    client = MqttClient(BrokerUrl.parse(broker_url), "", inbox=inbox)
    client.subscribe(view.topics.all_fleet_devices)
    client.subscribe(view.topics.all_events)
    await client.connect()
    blocked_since: dict[str, float] = {}
    notes: list[str] = []
    try:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    while True:
                        message = await inbox.get()
                        view.apply(message.topic, message.payload)
            if auto_refill:
                notes.extend(await _refill_blocked(view, api, blocked_since))
            _draw(header, view, notes[-4:])
    finally:
        await client.disconnect()


async def _refill_blocked(
    view: FleetView, api: httpx.AsyncClient, blocked_since: dict[str, float]
) -> list[str]:
    notes = []
    now = time.monotonic()
    for device, state in view.devices.items():
        if state.get("state") != "block":
            blocked_since.pop(device, None)
            continue
        since = blocked_since.setdefault(device, now)
        if now - since >= REFILL_AFTER_S:
            tokens = max(int(state.get("allocation", 100)) // 2, 50)
            await api.post(f"/v1/devices/{device}/refill", json={"tokens": tokens})
            blocked_since.pop(device)
            notes.append(
                f"auto-refill, blocked {REFILL_AFTER_S:.0f}s: tokenwell refill {device} {tokens}"
            )
    return notes


def _draw(header: str, view: FleetView, notes: list[str]) -> None:
    out = sys.stdout
    if out.isatty():
        out.write("\x1b[H\x1b[2J")
    out.write(header + "\n" + view.render() + "\n")
    if notes:
        out.write("\n" + "\n".join(notes) + "\n")
    out.write("\n")
    out.flush()


if os.environ.get("TOKENWELL_DEMO_DEBUG"):  # pragma: no cover
    import logging

    logging.basicConfig(level=logging.INFO)
