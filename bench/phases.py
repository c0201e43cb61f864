"""The benchmark's timed phases, each against the gateway running as its own process.

Every phase has its own folder (ledger, config), its own topic prefix and its own
persistent-session client id, so phases share the broker and nothing else.

- :func:`receive_floor`: a bare paho subscriber drains the backlog (the receive floor);
- :func:`drain`: the gateway drains the same backlog to committed charges;
- :func:`latency`: a steady load, publication to control message and to charge;
- :func:`memory`: resident memory and start-up with many active devices.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import astuple, dataclass, field
from pathlib import Path

from bench import mqtt
from bench.load import machine_busy
from bench.mqtt import BenchError, Drained
from bench.procs import GatewayProcess, cpu_seconds, run_gateway, wait_counted
from bench.profile import profiling
from bench.workload import (
    HUGE_ALLOCATION,
    BenchDevice,
    Signed,
    gateway_config,
    make_fleet,
    round_robin,
    sign,
    topics_of,
    write_ledger,
)
from gateway.errors import Rejection
from gateway.metrics import STAGES
from gateway.topics import Topics
from gateway.wire import decode_control_body, decode_envelope

SETTLE_QUIET = 0.7  # s without a publication: the gateway's start-up re-publishing is over


@dataclass(frozen=True, slots=True)
class Rig:
    """Where phases run: the broker's URL, a scratch folder, the broker's process id
    (None when it cannot be seen, e.g. in a container)."""

    broker: str
    home: Path
    broker_pid: int | None

    def folder(self, name: str) -> Path:
        folder = self.home / name
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def broker_cpu(self) -> float:
        """The broker's CPU seconds so far (0 when its process cannot be seen)."""
        return cpu_seconds(self.broker_pid) if self.broker_pid is not None else 0.0


@dataclass(frozen=True, slots=True)
class Setup:
    """One phase's gateway set-up: ledger, config, topics and persistent session."""

    db: Path
    config: Path
    topics: Topics
    client_id: str


def prepare(rig: Rig, name: str, groups: Sequence[tuple[Sequence[BenchDevice], int]]) -> Setup:
    """A folder for phase ``name`` with its devices in a new ledger and a config."""
    folder = rig.folder(name)
    prefix, client_id = f"bench/{name}", f"bench-{name}"
    db = folder / "ledger.sqlite3"
    write_ledger(db, groups)
    config = gateway_config(folder / "gateway.toml", prefix, client_id)
    return Setup(db, config, Topics(prefix), client_id)


def queue_backlog(rig: Rig, client_id: str, topics: Topics, reports: Sequence[Signed]) -> None:
    """Queue ``reports`` with the broker for persistent session ``client_id``."""
    mqtt.register_session(rig.broker, client_id, topics.all_usage)
    mqtt.publish_all(rig.broker, topics_of(topics.prefix, reports))


@contextmanager
def gateway(rig: Rig, setup: Setup) -> Iterator[GatewayProcess]:
    """The phase's gateway, ready."""
    with run_gateway(rig.broker, setup.db, setup.config) as process:
        yield process


def settle(rig: Rig, topics: Topics, timeout: float = 60) -> None:
    """Wait until the gateway's start-up publishing (retained control messages, fleet
    state of every device) has gone quiet."""
    with mqtt.recording(rig.broker, [f"{topics.prefix}/#"], keep=False) as recorder:
        recorder.wait_quiet(SETTLE_QUIET, timeout)


# --- floors and drain -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Batches:
    """The gateway's own account of its batches (its ``/metrics`` histograms): how many
    it committed, the seconds its commits took in all, and the mean seconds of each stage
    it times: verify, charge and queued a batch; commit and publish a commit (a commit
    may carry several batches)."""

    count: int
    commit_seconds: float
    stage_means: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, process: GatewayProcess) -> Batches:
        sums = process.histograms()
        count = int(sums.get("tokenwell_batch_size_count", 0))
        committed = sums.get("tokenwell_commit_seconds_sum", 0.0)
        series = {stage: ("tokenwell_stage_seconds", f'{{stage="{stage}"}}') for stage in STAGES}
        series["commit"] = ("tokenwell_commit_seconds", "")
        means = {
            stage: sums.get(f"{name}_sum{labels}", 0.0) / n
            for stage, (name, labels) in series.items()
            if (n := sums.get(f"{name}_count{labels}", 0.0))
        }
        return cls(count, committed, means)


@dataclass(frozen=True, slots=True)
class Drain:
    """The gateway's drain of a queued backlog, from the moment it may read to the last
    commit (``startup_seconds``: its start-up, with its devices and no backlog)."""

    reports: int
    seconds: float
    gateway_cpu: float
    broker_cpu: float
    startup_seconds: float
    batches: Batches
    loop_cpu: float  # the main thread's: the event loop
    busiest_thread_cpu: float  # the busiest other thread's, in the gateway's own process
    receiver_cpu: float  # the receiver process's (gateway.receiver), included in gateway_cpu
    writer_cpu: float  # the ledger's writer process's (gateway.writer), included too

    @property
    def rate(self) -> float:
        return self.reports / self.seconds


def receive_floor(rig: Rig, name: str, reports: Sequence[Signed]) -> tuple[Drained, float]:
    """A bare subscriber drains ``reports`` queued for its persistent session; returns
    the drain and the broker's CPU seconds meanwhile."""
    topics, client_id = Topics(f"bench/{name}"), f"bench-{name}"
    queue_backlog(rig, client_id, topics, reports)
    broker_cpu = rig.broker_cpu()
    drained = mqtt.drain_bare(rig.broker, client_id, topics.all_usage, len(reports))
    return drained, rig.broker_cpu() - broker_cpu


def receive_floor_reader(rig: Rig, name: str, reports: Sequence[Signed]) -> Drained:
    """:func:`receive_floor` with the gateway's own client instead of bare paho."""
    topics, client_id = Topics(f"bench/{name}"), f"bench-{name}"
    queue_backlog(rig, client_id, topics, reports)
    return mqtt.drain_reader(rig.broker, client_id, topics.all_usage, len(reports))


def drain(
    rig: Rig,
    name: str,
    devices: Sequence[BenchDevice],
    reports: Sequence[Signed],
    profile: Path | None = None,
) -> Drain:
    """Queue ``reports`` for a running gateway frozen with SIGSTOP (connected, reading
    nothing), let it go, and time it to the last report committed. Freezing rather than
    starting it keeps its start-up out of the figure: it has loaded its ledger and
    published its start-up state before. With ``profile``, py-spy samples it meanwhile."""
    setup = prepare(rig, name, [(devices, HUGE_ALLOCATION)])
    with gateway(rig, setup) as process:
        settle(rig, setup.topics)
        process.pause()
        mqtt.publish_all(rig.broker, topics_of(setup.topics.prefix, reports))
        cpu, broker_cpu = process.cpu_seconds_by_module(), rig.broker_cpu()
        threads = process.thread_cpu_seconds()
        sampling = profiling(process.pid, profile) if profile else contextlib.nullcontext()
        with sampling:
            process.resume()
            start = time.perf_counter()
            end = wait_counted(process, len(reports), timeout=60 + len(reports) / 200)
        by_module = {m: s - cpu.get(m, 0.0) for m, s in process.cpu_seconds_by_module().items()}
        broker_cpu = rig.broker_cpu() - broker_cpu
        used = {tid: s - threads.get(tid, 0.0) for tid, s in process.thread_cpu_seconds().items()}
        _check_all_charged(process, len(reports))
        batches = Batches.of(process)
        process.stop()
    loop = used.pop(process.pid, 0.0)
    busiest = max(used.values(), default=0.0)
    seconds = end - start
    startup = process.startup_seconds
    return Drain(
        len(reports), seconds, sum(by_module.values()), broker_cpu, startup, batches, loop,
        busiest, by_module.get("gateway.receiver", 0.0), by_module.get("gateway.writer", 0.0),
    )  # fmt: skip


def _check_all_charged(process: GatewayProcess, expected: int) -> None:
    counted = process.counted()
    if counted.get("charged", 0) != expected:
        raise BenchError(f"expected {expected} charged reports, the gateway counted {counted}")


# --- latency --------------------------------------------------------------------------

CROSSING_ALLOCATION = 100  # tokens: 10,000 api calls at 0.01
CROSSING_COUNTS = (8_000, 9_500, 10_000)  # balance 20% (throttle 50%), 5% (throttle 20%), 0
CROSSING_SHARE = 20  # one report in this many crosses a threshold


@dataclass(frozen=True, slots=True)
class Load:
    """A steady load: the messages in publication order, and which control message
    (device, control ``n``) each threshold-crossing report must cause."""

    reports: list[Signed]
    expected_controls: dict[tuple[str, int], int]  # (device, n) -> index in reports


def steady_load(steady: Sequence[BenchDevice], crossing: Sequence[BenchDevice], total: int) -> Load:
    """``total`` reports: every ``CROSSING_SHARE``-th takes one of the ``crossing``
    devices (allocation ``CROSSING_ALLOCATION``) over its next threshold (each device
    three times: throttle 50%, throttle 20%, block, i.e. control ``n`` 2, 3, 4 after
    the ``n`` 1 of provisioning); the rest charge ``steady`` devices round robin."""
    now_ms = time.time_ns() // 1_000_000
    filler = iter(round_robin(steady, total))
    reports: list[Signed] = []
    expected: dict[tuple[str, int], int] = {}
    crossings = iter(range(len(crossing) * len(CROSSING_COUNTS)))
    for index in range(total):
        turn = next(crossings, None) if index % CROSSING_SHARE == CROSSING_SHARE // 2 else None
        if turn is None:
            reports.append(next(filler))
            continue
        device, stage = crossing[turn % len(crossing)], turn // len(crossing)
        reports.append(sign(device, stage + 1, CROSSING_COUNTS[stage], now_ms))
        expected[(device.id, stage + 2)] = index
    return Load(reports, expected)


@dataclass(frozen=True, slots=True)
class Cores:
    """CPU seconds over a phase's ``seconds``: the whole machine's (all cores), the
    gateway's tree (and of it its receiver and its writer process), the broker's and the
    benchmark's own process (publisher, recorder); how many times the gateway's event
    loop blocked (voluntary context switches of its thread: waits for work); and how
    long its event loop, its receiver's threads and its writer's were ready to run but
    waited for a CPU (a busy machine's queue). Also one reading of those clocks
    (:meth:`now`); :meth:`between` two readings."""

    seconds: float
    machine: float
    gateway: float
    broker: float
    benchmark: float
    receiver: float
    writer: float
    loop_blocks: float
    loop_waited: float
    receiver_waited: float
    writer_waited: float

    @classmethod
    def now(cls, rig: Rig, process: GatewayProcess) -> Cores:
        """The clocks as they read now (each since its own start)."""
        by_module, waited = process.cpu_seconds_by_module(), process.waited_by_module()
        return cls(
            time.perf_counter(), machine_busy(), sum(by_module.values()), rig.broker_cpu(),
            time.process_time(), by_module.get("gateway.receiver", 0.0),
            by_module.get("gateway.writer", 0.0), process.loop_blocks(), waited["loop"],
            waited.get("gateway.receiver", 0.0), waited.get("gateway.writer", 0.0),
        )  # fmt: skip

    @classmethod
    def between(cls, first: Cores, last: Cores) -> Cores:
        """What each clock advanced from reading ``first`` to reading ``last``."""
        return cls(*(b - a for a, b in zip(astuple(first), astuple(last), strict=True)))


@dataclass(frozen=True, slots=True)
class Latency:
    """A steady load's delays in seconds: publication to control message (crossing
    reports), publication to the charge's time stamp in the ledger (every report); the
    CPU used from the first publication until the last report was committed."""

    offered_rate: float
    achieved_rate: float
    to_control: list[float]
    to_charge: list[float]
    cores: Cores
    batches: Batches


def latency(
    rig: Rig, name: str, steady: Sequence[BenchDevice], rate: float, seconds: float
) -> Latency:
    """Offer ``rate`` reports a second for ``seconds`` and time each report's effects."""
    total = max(int(rate * seconds), 3 * CROSSING_SHARE)
    crossing = make_fleet(f"{name}x", max(1, total // CROSSING_SHARE // len(CROSSING_COUNTS)))
    load = steady_load(steady, crossing, total)
    setup = prepare(rig, name, [(steady, HUGE_ALLOCATION), (crossing, CROSSING_ALLOCATION)])
    messages = topics_of(setup.topics.prefix, load.reports)
    control_topics = [f"{setup.topics.prefix}/devices/+/control"]
    with gateway(rig, setup) as process:
        settle(rig, setup.topics)
        with mqtt.recording(rig.broker, control_topics) as recorder:
            # Every device's retained control message comes first, at subscription (100,000
            # of them with 100,000 devices, which held live ones up for a second): let
            # them in before the clock starts.
            recorder.wait_quiet(SETTLE_QUIET, timeout=60)
            first = Cores.now(rig, process)
            stamps = mqtt.publish_paced(rig.broker, messages, rate, timeout=60 + seconds)
            achieved = total / (time.perf_counter() - first.seconds)
            wait_counted(process, total, timeout=60)
            cores = Cores.between(first, Cores.now(rig, process))
            controls = _control_delays(recorder, load, stamps)
        batches = Batches.of(process)
        process.stop()
    charges = _charge_delays(setup.db, load.reports, stamps)
    return Latency(rate, achieved, controls, charges, cores, batches)


def latency_floor(
    rig: Rig, name: str, steady: Sequence[BenchDevice], rate: float, seconds: float
) -> list[float]:
    """The same paced load, straight from publisher to a subscriber through the broker
    (no gateway): the delays the benchmark and the broker add by themselves."""
    topics = Topics(f"bench/{name}")
    reports = round_robin(steady, max(int(rate * seconds), 1))
    messages = topics_of(topics.prefix, reports)
    with mqtt.recording(rig.broker, [topics.all_usage]) as recorder:
        stamps = mqtt.publish_paced(rig.broker, messages, rate, timeout=60 + seconds)
        recorder.wait_for(lambda got: len(got) >= len(messages), 30, "the paced load")
    published = {payload: stamp for (_, payload), stamp in zip(messages, stamps, strict=True)}
    return [arrival.at - published[arrival.payload] for arrival in recorder.arrivals]


def _control_delays(recorder: mqtt.Recorder, load: Load, stamps: list[float]) -> list[float]:
    """Wait for every expected control message; the delay from its report's publication."""
    delays: dict[tuple[str, int], float] = {}
    scanned = [0]

    def complete(arrivals: list[mqtt.Arrival]) -> bool:
        for arrival in arrivals[scanned[0] :]:
            key = _control_key(arrival.payload)
            if key in load.expected_controls and key not in delays:
                delays[key] = arrival.at - stamps[load.expected_controls[key]]
        scanned[0] = len(arrivals)
        return len(delays) == len(load.expected_controls)

    recorder.wait_for(complete, 30, f"{len(load.expected_controls)} control messages")
    return list(delays.values())


def _control_key(payload: bytes) -> tuple[str, int] | None:
    envelope = decode_envelope(payload)
    if isinstance(envelope, Rejection):
        return None
    control = decode_control_body(envelope.body)
    return None if isinstance(control, Rejection) else (control.device, control.seq)


def _charge_delays(db: Path, reports: Sequence[Signed], stamps: Sequence[float]) -> list[float]:
    """Publication to the gateway's time stamp on the debit (taken as it charged the batch,
    just before committing it; whole milliseconds), for every report of the load."""
    published = {(r.device, r.count): stamps[i] for i, r in enumerate(reports)}
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as ledger:
        rows = ledger.execute("SELECT device, to_units, received_ms FROM debits").fetchall()
    return [ms / 1000 - published[(d, units)] for d, units, ms in rows if (d, units) in published]


# --- memory and start-up ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Memory:
    """Resident memory (MiB) and start-up (s) of an empty gateway and of one with
    ``devices`` devices that have each reported once."""

    devices: int
    baseline_mib: float
    baseline_startup: float
    rss_mib: float
    peak_mib: float
    startup: float
    startup_with_backlog: float
    restart_rss_mib: float

    @property
    def bytes_per_device(self) -> float:
        return (self.rss_mib - self.baseline_mib) * 2**20 / self.devices


def memory(rig: Rig, name: str, count: int) -> Memory:
    """Measure an empty gateway, then one with ``count`` active devices: RSS once its
    backlog (one report each) is committed and its publishing has settled, then the
    start-up of a restart."""
    empty = prepare(rig, f"{name}-empty", [])
    with gateway(rig, empty) as process:
        settle(rig, empty.topics)
        baseline, baseline_startup = process.memory_mib(), process.startup_seconds
        process.stop()
    devices = make_fleet(name, count)
    full = prepare(rig, name, [(devices, HUGE_ALLOCATION)])
    queue_backlog(rig, full.client_id, full.topics, round_robin(devices, count))
    with gateway(rig, full) as process:
        wait_counted(process, count, timeout=120 + count / 200)
        settle(rig, full.topics, timeout=300)
        rss, peak = process.memory_mib(), process.memory_mib("VmHWM")
        with_backlog = process.startup_seconds
        process.stop()
    with gateway(rig, full) as process:
        startup, restart_rss = process.startup_seconds, process.memory_mib()
        process.stop()
    return Memory(count, baseline, baseline_startup, rss, peak, startup, with_backlog, restart_rss)
