"""What the benchmark feeds the gateway: devices, pre-signed reports, a ledger, a config.

Everything is deterministic and built before any clock starts. A device's key is derived
from its id (``sha256("bench/" + id)``), so every run, and every phase of a run, signs the
same bytes. Devices are written straight into the SQLite ledger in one transaction, the
way the admin API would leave them (an initial grant, the ``ok``/``provisioned`` control
message already confirmed by the broker): provisioning 100,000 devices through HTTP would
take minutes and measure the API instead.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.config import DEFAULT_LADDER
from gateway.economics import Outcome, Pool, credit
from gateway.ledger import LedgerWrite
from gateway.metering import Device, next_control
from gateway.sqlite_ledger import SqliteLedger
from gateway.topics import Topics
from gateway.wire import UsageReport, sign_usage

METER = "api_calls"
PRICE = "0.01"  # tokens per api call: a report advancing its counter by 100 debits 1 token
ACCOUNT = "bench"
BOOT = 1
HUGE_ALLOCATION = 10**12  # never throttled: the drain and steady load charge, nothing more


@dataclass(frozen=True, slots=True)
class BenchDevice:
    """A simulated device: its id and its Ed25519 key."""

    id: str
    key: Ed25519PrivateKey

    @property
    def public_key(self) -> bytes:
        """The raw 32-byte public key, as the ledger keeps it."""
        return self.key.public_key().public_bytes_raw()


@dataclass(frozen=True, slots=True)
class Signed:
    """One pre-signed usage report: report number ``number`` of ``device`` carrying the
    cumulative count ``count``; ``payload`` is the envelope published on its usage topic."""

    device: str
    number: int
    count: int
    payload: bytes


def device_key(device_id: str) -> Ed25519PrivateKey:
    """The key of a benchmark device, derived from its id: the same in every run."""
    seed = hashlib.sha256(f"bench/{device_id}".encode()).digest()
    return Ed25519PrivateKey.from_private_bytes(seed)


def make_fleet(name: str, count: int) -> list[BenchDevice]:
    """``count`` devices called ``{name}000000``, ``{name}000001``, ..."""
    ids = (f"{name}{index:06d}" for index in range(count))
    return [BenchDevice(device_id, device_key(device_id)) for device_id in ids]


def sign(device: BenchDevice, number: int, count: int, now_ms: int) -> Signed:
    """Sign report ``number`` of ``device``, its ``api_calls`` counter at ``count``."""
    report = UsageReport(device.id, BOOT, number, now_ms, {METER: count})
    return Signed(device.id, number, count, sign_usage(report, device.key))


def round_robin(
    devices: Sequence[BenchDevice], total: int, *, first_number: int = 1, step: int = 100
) -> list[Signed]:
    """``total`` reports, one device after another, each counter ``step`` higher than the
    device's previous report (so every report charges); numbering starts at
    ``first_number``, so a later batch continues where an earlier one stopped."""
    now_ms = time.time_ns() // 1_000_000
    signed = []
    for index in range(total):
        number = first_number + index // len(devices)
        signed.append(sign(devices[index % len(devices)], number, number * step, now_ms))
    return signed


def topics_of(prefix: str, reports: Iterable[Signed]) -> list[tuple[str, bytes]]:
    """``(usage topic, payload)`` of each report under topic prefix ``prefix``."""
    topics = Topics(prefix)
    return [(topics.usage(report.device), report.payload) for report in reports]


def provisioned(device: BenchDevice, tokens: int, now_ms: int) -> tuple[Device, Outcome]:
    """The ledger records the admin API would have written for ``device``: the device
    and its dedicated pool's initial grant."""
    outcome = credit(Pool(device.id, ACCOUNT), tokens, now_ms, kind="initial")
    fresh = Device(
        id=device.id,
        public_key=device.public_key,
        account=ACCOUNT,
        pool=device.id,
        used=0,
        created_ms=now_ms,
        updated_ms=now_ms,
    )
    control = next_control(
        fresh, outcome.pool, DEFAULT_LADDER, now_ms, why="provisioned", force=True
    )
    assert control is not None  # forced
    return fresh._replace(control=control, control_sent=control.seq), outcome


def write_ledger(path: Path, groups: Sequence[tuple[Sequence[BenchDevice], int]]) -> None:
    """Provision every ``(devices, tokens each)`` group into a new ledger at ``path``, in
    one transaction."""
    now_ms = time.time_ns() // 1_000_000
    write = LedgerWrite()
    for devices, tokens in groups:
        for device in devices:
            record, outcome = provisioned(device, tokens, now_ms)
            write.devices.append(record)
            write.pools.append(outcome.pool)
            write.movements.extend(outcome.movements)
    asyncio.run(_commit(path, write))


async def _commit(path: Path, write: LedgerWrite) -> None:
    ledger = SqliteLedger(path)
    await ledger.open()
    try:
        await ledger.commit(write)
    finally:
        await ledger.close()


def gateway_config(path: Path, prefix: str, client_id: str) -> Path:
    """Write the gateway's TOML configuration: one priced meter, this phase's topic prefix
    and persistent-session client id; everything else at its default."""
    path.write_text(
        f'topic_prefix = "{prefix}"\nclient_id = "{client_id}"\n\n[meters]\n{METER} = "{PRICE}"\n',
        encoding="utf-8",
    )
    return path
