"""The benchmark's results: one flat table of numbers, the machine they came from, JSON
and a readable table with the issue's targets.

The ceiling a gateway can reach on the same cores is ``1 / (1/receive + 1/verify)``: each
report must be received (the bare-subscriber floor) and verified (the all-cores floor),
and both compete for the same CPUs, so their times per report add up.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import gateway
from bench.mqtt import Drained
from bench.phases import Batches, Cores, Drain, Latency, Memory
from bench.verify import VerifyFloor

Number = float | int | None


def ceiling(receive_rate: float, verify_rate: float) -> float:
    """The best drain rate a gateway can reach: receiving and verifying share the cores."""
    return 1 / (1 / receive_rate + 1 / verify_rate)


def percentile(values: Sequence[float], share: float) -> float:
    """The nearest-rank percentile: the smallest value with ``share`` of them at or below."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def _micros(seconds: float, count: int) -> float:
    return seconds / count * 1e6


def _delays(prefix: str, delays: Sequence[float]) -> dict[str, Number]:
    """Sample count, p50, p99 and maximum (ms) of ``delays`` (seconds)."""
    if not delays:
        return {f"{prefix}_samples": 0, f"{prefix}_p50_ms": None, f"{prefix}_p99_ms": None,
                f"{prefix}_max_ms": None}  # fmt: skip
    return {
        f"{prefix}_samples": len(delays),
        f"{prefix}_p50_ms": percentile(delays, 0.50) * 1000,
        f"{prefix}_p99_ms": percentile(delays, 0.99) * 1000,
        f"{prefix}_max_ms": max(delays) * 1000,
    }


def _batches(prefix: str, batches: Batches, reports: int, seconds: float) -> dict[str, Number]:
    """Batches committed, their mean size and commit time, the share of time committing,
    and the mean time in each other stage the gateway timed."""
    count = max(batches.count, 1)  # never 0 once reports were committed
    return {
        f"{prefix}_batches": batches.count,
        f"{prefix}_mean_batch": reports / count,
        f"{prefix}_mean_commit_ms": batches.commit_seconds / count * 1000,
        f"{prefix}_commit_share": batches.commit_seconds / seconds,
        **{
            f"{prefix}_stage_{stage}_ms": mean * 1000 for stage, mean in batches.stage_means.items()
        },
    }


def floor_results(
    floor: VerifyFloor, receive: Drained, broker_cpu: float, reader: Drained
) -> dict[str, Number]:
    """The floors and the ceiling they imply; also, for comparison, the receive floor of
    the gateway's own client (``reader``) and the ceiling it would imply."""
    return {
        "verify_one_core_per_s": floor.one_core,
        "verify_all_cores_per_s": floor.all_cores,
        "verify_threads_per_s": floor.threads,
        "verify_processes_per_s": floor.processes,
        "verify_sodium_one_core_per_s": floor.sodium_one_core,
        "verify_sodium_all_cores_per_s": floor.sodium_all_cores,
        "gateway_verify_one_core_per_s": floor.gateway_one_core,
        "receive_floor_per_s": receive.rate,
        "receive_floor_cpu_us_per_report": _micros(receive.cpu_seconds, receive.count),
        "receive_floor_broker_cpu_us_per_report": _micros(broker_cpu, receive.count) or None,
        "ceiling_per_s": ceiling(receive.rate, floor.sodium_all_cores),
        "ceiling_openssl_per_s": ceiling(receive.rate, floor.all_cores),
        "receive_floor_reader_per_s": reader.rate,
        "receive_floor_reader_cpu_us_per_report": _micros(reader.cpu_seconds, reader.count),
        "ceiling_reader_per_s": ceiling(reader.rate, floor.sodium_all_cores),
    }


def drain_results(drain: Drain, ceiling_rate: float, reader_ceiling: float) -> dict[str, Number]:
    """The gateway's drain, and its ratios to the ceiling and to the one its own client's
    receive floor implies."""
    return {
        "drain_per_s": drain.rate,
        "drain_ratio": drain.rate / ceiling_rate,
        "drain_ratio_reader": drain.rate / reader_ceiling,
        "drain_cpu_us_per_report": _micros(drain.gateway_cpu, drain.reports),
        "drain_gateway_cores": drain.gateway_cpu / drain.seconds,
        "drain_loop_cores": drain.loop_cpu / drain.seconds,
        "drain_busiest_thread_cores": drain.busiest_thread_cpu / drain.seconds,
        "drain_receiver_cores": drain.receiver_cpu / drain.seconds,
        "drain_writer_cores": drain.writer_cpu / drain.seconds,
        "drain_broker_cpu_us_per_report": _micros(drain.broker_cpu, drain.reports) or None,
        "drain_startup_s": drain.startup_seconds,
        **_batches("drain", drain.batches, drain.reports, drain.seconds),
    }


UNSTEADY = 0.2  # a round whose two ceilings differ by more than this share of the larger


def paired_ratios(
    drains: Sequence[float], before: Sequence[float], after: Sequence[float]
) -> list[float]:
    """Each drain round over the mean of the ceilings measured right before and right
    after it, in order."""
    return [
        drain / ((first + last) / 2)
        for drain, first, last in zip(drains, before, after, strict=True)
    ]


def steady_rounds(before: Sequence[float], after: Sequence[float]) -> list[bool]:
    """Whether the machine kept its speed across each round: its two ceilings agree
    within ``UNSTEADY``. A round in which it changed speed has no fair ceiling."""
    return [
        abs(last - first) <= UNSTEADY * max(first, last)
        for first, last in zip(before, after, strict=True)
    ]


def paired_ratio(ratios: Sequence[float], steady: Sequence[bool]) -> float:
    """``drain_ratio_paired``: the median ratio of the steady rounds (of every round when
    none was steady), the figure that a drifting machine disturbs least."""
    kept = [ratio for ratio, ok in zip(ratios, steady, strict=True) if ok] or list(ratios)
    return statistics.median(kept)


def latency_results(latency: Latency, floor: Sequence[float]) -> dict[str, Number]:
    """Delays at a steady load: to the control message, to the charge, and through the
    broker alone (the floor)."""
    return {
        **_delays("latency_floor", floor),
        "latency_offered_per_s": latency.offered_rate,
        "latency_achieved_per_s": latency.achieved_rate,
        **_cores("latency", latency.cores),
        **_batches("latency", latency.batches, len(latency.to_charge), latency.cores.seconds),
        **_delays("latency", latency.to_control),
        **_delays("charge_latency", latency.to_charge),
    }


def _cores(prefix: str, cores: Cores) -> dict[str, Number]:
    """Cores in use on average: the gateway's (and of them its receiver's and its
    writer's), the broker's, the benchmark's own, how busy the whole machine was (a share
    of all its cores); how often a second the gateway's event loop waited for work; and
    the share of the time its event loop, receiver and writer waited for a CPU."""
    seconds = max(cores.seconds, 1e-9)
    return {
        f"{prefix}_gateway_cores": cores.gateway / seconds,
        f"{prefix}_receiver_cores": cores.receiver / seconds,
        f"{prefix}_writer_cores": cores.writer / seconds,
        f"{prefix}_loop_blocks_per_s": cores.loop_blocks / seconds,
        f"{prefix}_loop_cpu_wait": cores.loop_waited / seconds,
        f"{prefix}_receiver_cpu_wait": cores.receiver_waited / seconds,
        f"{prefix}_writer_cpu_wait": cores.writer_waited / seconds,
        f"{prefix}_broker_cores": cores.broker / seconds,
        f"{prefix}_benchmark_cores": cores.benchmark / seconds,
        f"{prefix}_machine_busy": cores.machine / seconds / (os.cpu_count() or 1),
    }


MEMORY_KEYS = (
    "memory_devices", "rss_baseline_mib", "rss_mib", "rss_peak_mib", "rss_bytes_per_device",
    "restart_rss_mib", "startup_s", "startup_empty_s", "startup_backlog_s",
)  # fmt: skip


def memory_results(memory: Memory | None) -> dict[str, Number]:
    """Memory per device and start-up times (all None when the phase was skipped)."""
    if memory is None:
        return dict.fromkeys(MEMORY_KEYS)
    values = (
        memory.devices, memory.baseline_mib, memory.rss_mib, memory.peak_mib,
        memory.bytes_per_device, memory.restart_rss_mib, memory.startup,
        memory.baseline_startup, memory.startup_with_backlog,
    )  # fmt: skip
    return dict(zip(MEMORY_KEYS, values, strict=True))


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    models = [
        line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if "model name" in line
    ]
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpu": models[0] if models else platform.processor(),
        "cores": os.cpu_count(),
        "memory_gib": round(pages / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "packages": {name: version(name) for name in ("paho-mqtt", "cryptography", "msgpack")},
        "mosquitto": _run(["mosquitto", "-h"], "/usr/sbin").split("\n", 1)[0],
        "commit": _run(["git", "rev-parse", "--short", "HEAD"]),
        "uncommitted_changes": bool(_run(["git", "status", "--porcelain", "--", "gateway"])),
        # the gateway's charging core as mypyc compiled it, or as Python (gateway/__init__.py)
        "core": "compiled" if gateway.core_is_compiled() else "python",
    }


def _run(command: list[str], extra_path: str = "") -> str:
    env = {**os.environ, "PATH": os.environ.get("PATH", "") + os.pathsep + extra_path}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, env=env)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip()


@dataclass(frozen=True, slots=True)
class Row:
    """A line of the printed table: label, key, format, and the target it must meet."""

    label: str
    key: str
    fmt: str
    target: str = ""
    meets: tuple[str, float] | None = None  # (">=" or "<", bound)


ROWS = (
    Row("verify (OpenSSL), one core", "verify_one_core_per_s", "{:,.0f} /s"),
    Row("verify (OpenSSL), all cores", "verify_all_cores_per_s", "{:,.0f} /s"),
    Row("verify (libsodium), one core", "verify_sodium_one_core_per_s", "{:,.0f} /s"),
    Row("verify (libsodium), all cores", "verify_sodium_all_cores_per_s", "{:,.0f} /s"),
    Row("gateway's verify(), one core", "gateway_verify_one_core_per_s", "{:,.0f} /s"),
    Row("receive floor (bare paho)", "receive_floor_per_s", "{:,.0f} /s"),
    Row("ceiling 1/(1/recv + 1/verify)", "ceiling_per_s", "{:,.0f} /s"),
    Row("  with OpenSSL's verify", "ceiling_openssl_per_s", "{:,.0f} /s"),
    Row("receive floor (gateway's client)", "receive_floor_reader_per_s", "{:,.0f} /s"),
    Row("  ceiling with it", "ceiling_reader_per_s", "{:,.0f} /s"),
    Row("gateway drain", "drain_per_s", "{:,.0f} /s", ">= 8,000 /s", (">=", 8000)),
    Row("drain / ceiling (best / best)", "drain_ratio", "{:.2f}"),
    Row("drain / ceiling, round by round", "drain_ratio_paired", "{:.2f}", ">= 0.80", (">=", 0.8)),
    Row("drain / ceiling with its client", "drain_ratio_reader", "{:.2f}"),
    Row("gateway CPU per report", "drain_cpu_us_per_report", "{:.0f} us"),
    Row("gateway cores in use", "drain_gateway_cores", "{:.2f}"),
    Row("  event loop thread", "drain_loop_cores", "{:.2f}"),
    Row("  busiest other thread", "drain_busiest_thread_cores", "{:.2f}"),
    Row("  receiver process", "drain_receiver_cores", "{:.2f}"),
    Row("  writer process", "drain_writer_cores", "{:.2f}"),
    Row("time spent committing", "drain_commit_share", "{:.0%}"),
    Row("broker CPU per report", "drain_broker_cpu_us_per_report", "{:.0f} us"),
    Row("offered load (latency phase)", "latency_achieved_per_s", "{:,.0f} /s"),
    Row("report -> control, p50", "latency_p50_ms", "{:.1f} ms"),
    Row("report -> control, p99", "latency_p99_ms", "{:.1f} ms", "< 50 ms", ("<", 50)),
    Row("report -> control, max", "latency_max_ms", "{:.1f} ms"),
    Row("report -> charge, p50", "charge_latency_p50_ms", "{:.1f} ms"),
    Row("report -> charge, p99", "charge_latency_p99_ms", "{:.1f} ms"),
    Row("publisher -> subscriber, p99", "latency_floor_p99_ms", "{:.1f} ms"),
    Row("stages (latency), mean; batch of", "latency_mean_batch", "{:.0f} rep."),
    Row("  verify a batch", "latency_stage_verify_ms", "{:.2f} ms"),
    Row("  charge a batch", "latency_stage_charge_ms", "{:.2f} ms"),
    Row("  a batch queued for its commit", "latency_stage_queued_ms", "{:.2f} ms"),
    Row("  commit (one or more batches)", "latency_stage_commit_ms", "{:.2f} ms"),
    Row("  publish after a commit", "latency_stage_publish_ms", "{:.2f} ms"),
    Row("machine busy (latency phase)", "latency_machine_busy", "{:.0%}"),
    Row("  gateway cores", "latency_gateway_cores", "{:.2f}"),
    Row("    receiver process", "latency_receiver_cores", "{:.2f}"),
    Row("    writer process", "latency_writer_cores", "{:.2f}"),
    Row("    event loop waits for work", "latency_loop_blocks_per_s", "{:,.0f} /s"),
    Row("    waits for a CPU: event loop", "latency_loop_cpu_wait", "{:.0%}"),
    Row("                     receiver", "latency_receiver_cpu_wait", "{:.0%}"),
    Row("                     writer", "latency_writer_cpu_wait", "{:.0%}"),
    Row("  broker cores", "latency_broker_cores", "{:.2f}"),
    Row("  benchmark's own cores", "latency_benchmark_cores", "{:.2f}"),
    Row("RSS, empty gateway", "rss_baseline_mib", "{:.0f} MiB"),
    Row("RSS, memory devices", "rss_mib", "{:.0f} MiB"),
    Row("RSS per device", "rss_bytes_per_device", "{:.0f} B", "< 1,024 B", ("<", 1024)),
    Row("start-up, memory devices", "startup_s", "{:.2f} s", "< 5 s", ("<", 5)),
)


def _verdict(row: Row, value: Number) -> str:
    if row.meets is None or value is None:
        return ""
    sign, bound = row.meets
    ok = value >= bound if sign == ">=" else value < bound
    return "ok" if ok else "MISSED"


def table(document: dict[str, Any]) -> str:
    """The results as a readable table, with each target and whether it was met."""
    results, params, host = document["results"], document["parameters"], document["machine"]
    head = (
        f"Tokenwell benchmark, {host['date']}, commit {host['commit'] or '?'}"
        f" (core {host.get('core', '?')}): "
        f"{host['cores']} x {host['cpu']}\n{params['devices']:,} devices, "
        f"{params['reports']:,} reports, {results['memory_devices'] or 0:,} memory devices"
    )
    lines = [head, ""]
    for row in ROWS:
        value = results.get(row.key)
        shown = "-" if value is None else row.fmt.format(value)
        lines.append(f"  {row.label:<32}{shown:>14}  {row.target:<12}{_verdict(row, value)}")
    return "\n".join([*lines, "", _background(document.get("background_cores", {}))])


BUSY = 0.15  # cores of other work during a phase that make its numbers doubtful


def _background(cores: dict[str, float]) -> str:
    """A line on the machine's other load per phase, and a warning when it was high."""
    shown = ", ".join(f"{phase} {value:.2f}" for phase, value in cores.items())
    line = f"Other work on the machine, in cores: {shown}."
    busy = [phase for phase, value in cores.items() if value > BUSY]
    if busy:
        line += f"\nWARNING: the machine was busy during {', '.join(busy)}: rerun when it is idle."
    return line
