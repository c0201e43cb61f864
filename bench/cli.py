"""The command line: ``python -m bench [options]``; runs every phase, writes JSON, prints
a table. Exit status 0 when the benchmark ran (whether or not targets were met), 1 when
a phase failed, 130 on Ctrl-C; brokers and gateways are stopped either way.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any

from bench import phases, report, verify
from bench.load import Watch
from bench.mqtt import BenchError
from bench.phases import Rig
from bench.procs import find_process
from bench.profile import gil_profile, summarise
from bench.workload import make_fleet, round_robin
from broker import BrokerStartError, start_broker

RESULTS = Path(__file__).with_name("results")
QUICK = {"devices": 20, "reports": 400, "latency_seconds": 1.0, "memory_devices": 500, "rounds": 1}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Tokenwell's benchmark: drain rate against its floors, latency, memory "
        "and start-up (docs/performance.md).",
    )
    add = parser.add_argument
    add("--devices", type=int, default=1000, help="devices sending the backlog (default 1000)")
    add("--reports", type=int, default=20_000, help="reports in the backlog (default 20000)")
    add("--memory-devices", type=int, default=100_000, help="devices for memory and start-up")
    add("--latency-seconds", type=float, default=10.0, help="length of the steady load")
    add(
        "--latency-rate", type=float,
        help="offered load of the latency phase, reports/s (default: half the drain rate); "
        "a fixed rate compares runs of different drain rates",
    )  # fmt: skip
    add("--rounds", type=int, default=3, help="rounds of floors and drain (best kept)")
    add("--skip-memory", action="store_true", help="leave out the memory and start-up phase")
    add("--profile", type=Path, help="also drain under py-spy, raw profile to this file")
    add("--quick", action="store_true", help="tiny sizes, only to check the benchmark runs")
    add("--out", type=Path, help="JSON results (default bench/results/DATE-COMMIT.json)")
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    if min(args.devices, args.reports, args.memory_devices, args.rounds) < 1:
        build_parser().error("sizes and rounds must be at least 1")
    if args.latency_rate is not None and args.latency_rate <= 0:
        build_parser().error("--latency-rate must be positive")
    return args


class Session:
    """One run, phase after phase: the workload, the results so far, details, and how many
    cores other work kept busy during each phase (:mod:`bench.load`)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.devices = make_fleet("dev", args.devices)
        self.backlog = round_robin(self.devices, args.reports)
        self.results: dict[str, report.Number] = {}
        self.details: dict[str, Any] = {}
        self.background: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str, what: str) -> Iterator[None]:
        """Announce a phase on stderr and watch the machine's other load meanwhile.

        The garbage collector is off during a phase: with 100,000 devices this process
        holds millions of objects (the workload, the phase's messages and time stamps),
        and each full collection stopped its publisher and recorder for 40-110 ms, a
        dozen times a phase (docs/performance.md). Nothing it makes then needs the
        collector to be freed; it is collected at the phase's end."""
        print(f"{what} ...", file=sys.stderr, flush=True)
        watch = Watch()
        gc.disable()
        try:
            yield
        finally:
            gc.enable()
            gc.collect()
        self.background[name] = round(watch.foreign_cores(), 3)

    def floors(self, rig: Rig, verified: verify.VerifyFloor) -> None:
        """The receive floor (best of the rounds); with the verify floor, the ceiling.
        Also the gateway's own client's receive floor, rounds alternated with paho's."""
        rounds = self.args.rounds
        with self.phase("receive", f"receive floors, best of {rounds}"):
            drains, readers = [], []
            for i in range(rounds):
                drains.append(phases.receive_floor(rig, f"floor{i}", self.backlog))
                readers.append(phases.receive_floor_reader(rig, f"reader{i}", self.backlog))
            receive, broker_cpu = max(drains, key=lambda pair: pair[0].rate)
            reader = max(readers, key=lambda each: each.rate)
        self.results |= report.floor_results(verified, receive, broker_cpu, reader)
        self.details["verify_parallelism"] = verified.parallelism
        self.details["verify_workers"] = verified.workers

    def drain(self, home: Path) -> float:
        """The gateway's drain (best of the rounds, each with its ceilings on a broker of
        its own), then, if asked, one under py-spy; returns the best rate."""
        rounds, devices, backlog = self.args.rounds, self.devices, self.backlog
        drains, before, after = [], [], []
        with self.phase("drain", f"gateway drain, best of {rounds}, each between two ceilings"):
            for i in range(rounds):
                with broker_rig(home, f"round{i}") as rig:
                    before.append(self.ceiling_now(rig, f"before{i}"))
                    drains.append(phases.drain(rig, f"drain{i}", devices, backlog))
                    after.append(self.ceiling_now(rig, f"after{i}"))
        best = max(drains, key=lambda each: each.rate)
        self.details["drain_rates"] = [round(each.rate) for each in drains]
        ratios = report.paired_ratios([each.rate for each in drains], before, after)
        steady = report.steady_rounds(before, after)
        self.details["ceilings_before"] = [round(each) for each in before]
        self.details["ceilings_after"] = [round(each) for each in after]
        self.details["paired_ratios"] = [round(each, 3) for each in ratios]
        self.details["steady_rounds"] = steady
        ceiling, reader_ceiling = (
            float(self.results[key] or 1) for key in ("ceiling_per_s", "ceiling_reader_per_s")
        )
        self.results |= report.drain_results(best, ceiling, reader_ceiling)
        self.results["drain_ratio_paired"] = report.paired_ratio(ratios, steady)
        if self.args.profile:
            with broker_rig(home, "profile") as rig:
                self.profile(rig, self.args.profile)
        return best.rate

    def ceiling_now(self, rig: Rig, name: str) -> float:
        """The ceiling measured again, right before or after a drain round: one receive
        floor and one all-cores verification round (the ratio of a drain to a ceiling
        measured minutes apart mixes two speeds of a machine whose speed drifts)."""
        received, _ = phases.receive_floor(rig, name, self.backlog)
        return report.ceiling(received.rate, verify.threaded_rate(self.checks))

    @cached_property
    def checks(self) -> list[verify.Check]:
        """The backlog's signature checks, decoded once for every round that needs them."""
        return verify.checks(self.backlog, self.devices)

    def profile(self, rig: Rig, out: Path) -> None:
        """One more drain, sampled by py-spy into ``out``; prints the summaries."""
        with self.phase("profile", f"gateway drain under py-spy, into {out}"):
            sampled = phases.drain(rig, "profiled", self.devices, self.backlog, profile=out)
        self.results["profiled_drain_per_s"] = sampled.rate
        for path in (out, gil_profile(out)):
            print(f"--- {path}\n{summarise(path)}", file=sys.stderr)

    def latency(self, rig: Rig, rate: float) -> None:
        """Latency at ``rate`` through the gateway, and through the broker alone."""
        seconds = self.args.latency_seconds
        with self.phase("latency", f"latency at {rate:,.0f} reports/s for {seconds:g} s"):
            timed = phases.latency(rig, "latency", self.devices, rate, seconds)
            direct = phases.latency_floor(rig, "latency-floor", self.devices, rate, seconds)
        self.results |= report.latency_results(timed, direct)

    def memory(self, rig: Rig) -> None:
        """Memory and start-up, unless skipped (then its figures are null)."""
        measured = None
        if not self.args.skip_memory:
            count = self.args.memory_devices
            with self.phase("memory", f"memory and start-up, {count:,} devices"):
                measured = phases.memory(rig, "memory", count)
        self.results |= report.memory_results(measured)


@contextmanager
def broker_rig(home: Path, name: str) -> Iterator[Rig]:
    """A rig on a broker of its own (its data in ``home/broker-name``), stopped on exit.

    A phase, or a drain round with its two ceilings, gets a new broker: one that kept an
    earlier phase's retained messages (two a device: a control message and a fleet
    state, 124 MB with 100,000 devices) would make every save of the broker's, which
    stops it for about 2.4 ms a MB, that much longer (docs/performance.md).
    """
    with start_broker(home / f"broker-{name}") as broker:
        yield Rig(broker.url, home, find_process(str(broker.data_dir / "mosquitto.conf")))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every phase, in order; the results document."""
    host = report.machine()
    session = Session(args)
    with session.phase("verify", f"verification floor, {len(session.backlog):,} reports"):
        verified = verify.measure(session.backlog, session.devices, args.rounds)
    with tempfile.TemporaryDirectory(prefix="tokenwell-bench-") as temp:
        home = Path(temp)
        with broker_rig(home, "floors") as rig:
            session.floors(rig, verified)
        drained = session.drain(home)
        with broker_rig(home, "latency") as rig:
            session.latency(rig, args.latency_rate or drained / 2)
        with broker_rig(home, "memory") as rig:
            session.memory(rig)
    return {
        "benchmark": "tokenwell",
        "format": 1,
        "machine": host,
        "parameters": {k: v for k, v in vars(args).items() if k not in ("out", "profile")},
        "details": session.details,
        "background_cores": session.background,
        "results": session.results,
    }


def write(document: dict[str, Any], out: Path | None) -> Path:
    """Write the JSON document; returns where."""
    host = document["machine"]
    out = out or RESULTS / f"{host['date'][:10]}-{host['commit'] or 'unknown'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the exit status."""
    args = parse_args(argv)
    try:
        document = run(args)
    except (BenchError, BrokerStartError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print(report.table(document))
    print(f"\nresults written to {write(document, args.out)}")
    return 0
