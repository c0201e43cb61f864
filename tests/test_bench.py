"""The shipped benchmark (``python -m bench``) runs end to end at tiny sizes and writes
every figure. Speed is never asserted in tests: only that each figure was measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

from bench import procs, report

ROOT = Path(__file__).resolve().parent.parent

MEASURED = [
    "verify_one_core_per_s", "verify_all_cores_per_s", "verify_threads_per_s",
    "verify_processes_per_s", "gateway_verify_one_core_per_s", "receive_floor_per_s",
    "ceiling_per_s", "ceiling_openssl_per_s", "verify_sodium_one_core_per_s",
    "verify_sodium_all_cores_per_s", "drain_per_s", "drain_ratio", "drain_ratio_paired",
    "drain_cpu_us_per_report",
    "drain_gateway_cores", "drain_startup_s", "drain_batches", "latency_offered_per_s",
    "latency_achieved_per_s", "latency_samples", "latency_p50_ms", "latency_p99_ms",
    "latency_max_ms", "charge_latency_samples", "latency_floor_samples", "latency_floor_p99_ms",
    "receive_floor_reader_per_s", "ceiling_reader_per_s", "drain_ratio_reader",
    "drain_receiver_cores", "latency_gateway_cores", "latency_benchmark_cores",
    "latency_machine_busy", "latency_stage_verify_ms", "latency_stage_charge_ms",
    "latency_stage_queued_ms", "latency_stage_publish_ms", "latency_stage_commit_ms",
    "drain_stage_charge_ms", "latency_receiver_cores", "latency_loop_blocks_per_s",
]  # fmt: skip
# Measured, but a tiny run may use less than a clock tick (10 ms) of a process's CPU.
# So may the waits for a CPU of an idle machine (and a kernel without scheduler statistics).
MEASURED_MAY_BE_ZERO = [
    "drain_writer_cores", "latency_broker_cores", "latency_writer_cores",
    "latency_loop_cpu_wait", "latency_receiver_cpu_wait", "latency_writer_cpu_wait",
]  # fmt: skip
MEMORY = ["memory_devices", "rss_baseline_mib", "rss_mib", "rss_bytes_per_device", "startup_s"]


def test_the_quick_benchmark_runs_and_writes_every_figure(tmp_path: Path) -> None:
    """``--quick --skip-memory`` exits 0, prints the table and writes a JSON document in
    which every measured figure is a positive number and the skipped ones are null."""
    out = tmp_path / "results.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--skip-memory", "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=False, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "gateway drain" in result.stdout
    document = json.loads(out.read_text())
    results = document["results"]
    for key in MEASURED:
        value = results[key]
        assert isinstance(value, int | float), key
        assert value > 0, key
    for key in MEASURED_MAY_BE_ZERO:
        assert isinstance(results[key], int | float), key
        assert results[key] >= 0, key
    for key in MEMORY:
        assert results[key] is None, key
    assert document["machine"]["cores"] >= 1
    assert set(document["background_cores"]) == {"verify", "receive", "drain", "latency"}


def test_each_round_is_held_against_the_mean_of_the_ceilings_around_it() -> None:
    ratios = report.paired_ratios([8_000, 9_000], before=[10_000, 9_000], after=[10_000, 11_000])
    assert ratios == [0.8, 0.9]


def test_rounds_in_which_the_machine_changed_speed_do_not_count() -> None:
    # Round 2's ceiling fell by a third across it: its ratio (1.06) says nothing fair.
    before, after = [15_000, 15_000, 14_800], [15_200, 10_000, 15_100]
    steady = report.steady_rounds(before, after)
    assert steady == [True, False, True]
    ratios = report.paired_ratios([11_000, 13_200, 11_500], before, after)
    assert report.paired_ratio(ratios, steady) == (ratios[0] + ratios[2]) / 2  # their median
    # With no steady round at all, every round counts.
    assert report.paired_ratio([0.5, 0.7, 0.9], [False, False, False]) == 0.7


def test_waits_for_a_cpu_are_read_per_thread_and_summed_per_process() -> None:
    """A process's wait is the sum over its threads (so never below its main thread's,
    read before it); a process that does not exist has waited nothing."""
    started, stop = threading.Event(), threading.Event()
    worker = threading.Thread(target=lambda: (started.set(), stop.wait()))
    worker.start()
    started.wait()
    try:
        main_thread = procs.waited_seconds(os.getpid(), os.getpid())
        whole = procs.waited_seconds(os.getpid())
    finally:
        stop.set()
        worker.join()
    assert 0.0 <= main_thread <= whole
    assert procs.waited_seconds(2**22 + 1) == 0.0  # above Linux's largest process id
