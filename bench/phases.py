"""The benchmark's phases and its command line (see bench/run.py for the method)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from bench.run import (
    PREFIX,
    T0,
    Results,
    bare_receive,
    device_key,
    free_port,
    gateway,
    publish_backlog,
    register_session,
    sign_backlog,
    verify_rates,
    wait_processed,
    write_ledger,
)
from broker import RunningBroker, start_broker
from gateway.mqtt import BrokerUrl, Incoming, MqttClient
from gateway.wire import UsageReport, sign_usage


def drain(
    broker: RunningBroker, folder: Path, results: Results, backlog: list[tuple[str, bytes]]
) -> None:
    """Phase 3: the gateway drains a backlog queued while it was down."""
    asyncio.run(write_ledger(folder / "ledger.sqlite3", results.devices, 10**12))
    asyncio.run(register_session(broker.url, "bench-gateway"))
    asyncio.run(publish_backlog(broker.url, backlog))
    with gateway(broker.url, folder, free_port()) as gw:
        cpu, start = gw.cpu_seconds(), time.perf_counter()
        end = wait_processed(gw, len(backlog))
        cpu_used = gw.cpu_seconds() - cpu
    results.drain_rate = len(backlog) / (end - start)
    results.drain_cpu_us_per_report = cpu_used / len(backlog) * 1e6
    results.drain_ratio = results.drain_rate / results.ceiling


def latency(broker: RunningBroker, folder: Path, results: Results, seconds: float) -> None:
    """Phase 4: a steady load at half the drain rate, in which one report in twenty
    exhausts a fresh device's allocation: time its publication to the signed ``block``
    control message (verify, charge, commit, acknowledge, sign, publish)."""
    rate = results.drain_rate / 2
    count = max(int(rate * seconds), 100)
    crossing = max(count // 20, 10)
    ledger = folder / "ledger.sqlite3"
    asyncio.run(write_ledger(ledger, results.devices, 10**12))
    asyncio.run(write_ledger(ledger, crossing, 10, prefix="lat"))
    steady = iter(sign_backlog(results.devices, count, first_n=10**6))
    exhaust = [
        (
            f"lat-{i:06d}",
            sign_usage(UsageReport(f"lat-{i:06d}", 1, 1, T0, {"api_calls": 5000}), device_key(i)),
        )
        for i in range(crossing)
    ]
    load = [
        exhaust[i // 20] if i % 20 == 10 and i // 20 < crossing else next(steady)
        for i in range(count)
    ]
    with gateway(broker.url, folder, free_port()):
        delays = asyncio.run(_offer(broker.url, load, rate, {d for d, _ in exhaust}))
    delays.sort()
    results.latency_offered_rate = rate
    results.latency_samples = len(delays)
    results.latency_p50_ms = delays[len(delays) // 2] * 1000
    results.latency_p99_ms = delays[min(len(delays) - 1, int(len(delays) * 0.99))] * 1000
    results.latency_max_ms = delays[-1] * 1000


async def _offer(
    url: str, load: list[tuple[str, bytes]], rate: float, timed: set[str]
) -> list[float]:
    """Publish ``load`` at ``rate``; the delays to the control messages of ``timed`` devices."""
    inbox: asyncio.Queue[Incoming] = asyncio.Queue()
    client = MqttClient(BrokerUrl.parse(url), f"bench-lat-{os.getpid()}", inbox=inbox)
    client.subscribe(f"{PREFIX}/devices/+/control")
    await client.connect()
    sent: dict[str, float] = {}
    delays: list[float] = []

    async def collect() -> None:
        while len(delays) < len(timed):
            message = await inbox.get()
            device = message.topic.split("/")[-2]
            if device in sent:
                delays.append(time.perf_counter() - sent.pop(device))

    collector = asyncio.create_task(collect())
    start = time.perf_counter()
    for index, (device, payload) in enumerate(load):
        due = start + index / rate
        if (pause := due - time.perf_counter()) > 0.001:
            await asyncio.sleep(pause)
        if device in timed:
            sent[device] = time.perf_counter()
        client.publish(f"{PREFIX}/devices/{device}/usage", payload)
    await asyncio.wait_for(collector, 120)
    await client.disconnect()
    return delays


def memory(broker: RunningBroker, folder: Path, results: Results, devices: int) -> None:
    """Phase 5: start-up and resident memory with ``devices`` active devices."""
    empty = folder / "empty"
    empty.mkdir()
    with gateway(broker.url, empty, free_port()) as gw:
        results.rss_baseline_mib = gw.rss_mib()
    full = folder / "full"
    full.mkdir()
    asyncio.run(write_ledger(full / "ledger.sqlite3", devices, 10**9, prefix="mem"))
    backlog = sign_backlog(devices, devices, prefix="mem")
    with gateway(broker.url, full, free_port()) as gw:  # first start: makes its session
        pass
    asyncio.run(publish_backlog(broker.url, backlog))
    with gateway(broker.url, full, free_port()) as gw:
        results.startup_s = gw.startup_s
        wait_processed(gw, devices)
        results.rss_total_mib = gw.rss_mib()
    results.memory_devices = devices
    results.rss_bytes_per_device = (
        (results.rss_total_mib - results.rss_baseline_mib) * 2**20 / devices
    )


def machine() -> dict[str, str | int | None]:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    names = (line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    model = next(names, platform.processor())
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    )
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(),
            "commit": commit.stdout.strip() or None, "date": time.strftime("%Y-%m-%d")}  # fmt: skip


def run(args: argparse.Namespace) -> Results:
    results = Results(machine=machine(), devices=args.devices, reports=args.reports)
    backlog = sign_backlog(args.devices, args.reports)
    results.verify_one_core, results.verify_all_cores = verify_rates(backlog, args.devices)
    with tempfile.TemporaryDirectory(prefix="tokenwell-bench-") as temp:
        home = Path(temp)
        with start_broker(home / "broker") as broker:
            asyncio.run(register_session(broker.url, "bench-bare"))
            asyncio.run(publish_backlog(broker.url, backlog))
            results.receive_floor = bare_receive(broker.url, "bench-bare", len(backlog))
            results.ceiling = 1 / (1 / results.receive_floor + 1 / results.verify_all_cores)
            for phase in ("drain", "latency", "memory"):
                (home / phase).mkdir()
            drain(broker, home / "drain", results, backlog)
            latency(broker, home / "latency", results, args.latency_seconds)
            if not args.skip_memory:
                memory(broker, home / "memory", results, args.memory_devices)
    return results


TABLE = [
    ("verify, one core", "verify_one_core", "{:,.0f} /s"),
    ("verify, all cores", "verify_all_cores", "{:,.0f} /s"),
    ("receive floor (bare paho)", "receive_floor", "{:,.0f} /s"),
    ("ceiling 1/(1/recv+1/verify)", "ceiling", "{:,.0f} /s"),
    ("gateway drain", "drain_rate", "{:,.0f} /s"),
    ("drain / ceiling", "drain_ratio", "{:.2f}"),
    ("CPU per report", "drain_cpu_us_per_report", "{:.0f} us"),
    ("latency offered load", "latency_offered_rate", "{:,.0f} /s"),
    ("report -> control p50", "latency_p50_ms", "{:.1f} ms"),
    ("report -> control p99", "latency_p99_ms", "{:.1f} ms"),
    ("report -> control max", "latency_max_ms", "{:.1f} ms"),
    ("start-up, memory devices", "startup_s", "{:.2f} s"),
    ("RSS per device", "rss_bytes_per_device", "{:.0f} B"),
    ("RSS total / baseline", "rss_total_mib", "{:.0f} MiB"),
]


def table(results: Results) -> str:
    values = asdict(results)
    lines = [f"Tokenwell benchmark: {results.devices} devices, {results.reports} reports, "
             f"{results.memory_devices} memory devices; {results.machine}"]  # fmt: skip
    lines += [f"  {label:<30} {fmt.format(values[key])}" for label, key, fmt in TABLE]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--reports", type=int, default=30000)
    parser.add_argument("--memory-devices", type=int, default=100_000)
    parser.add_argument("--latency-seconds", type=float, default=10.0)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes, to check the benchmark runs"
    )
    parser.add_argument(
        "--out", type=Path, help="JSON results file (default bench/results/DATE-COMMIT.json)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.devices, args.reports, args.memory_devices, args.latency_seconds = 20, 400, 500, 1.0
    results = run(args)
    print(table(results))
    out = (
        args.out
        or Path("bench/results") / f"{results.machine['date']}-{results.machine['commit']}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(asdict(results), indent=2) + "\n")
    print(f"results written to {out}")
    return 0
