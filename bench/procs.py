"""The gateway as a process of its own, measured from the outside through ``/proc``.

It runs exactly as an operator runs it (``python -m gateway.cli gateway ...``), so its CPU
time (``utime + stime`` of ``/proc/PID/stat``) and resident memory (``VmRSS`` of
``/proc/PID/status``) are its own and nobody else's. They are summed over its process
tree: the gateway and the processes it starts (the receiver, ``gateway.receiver``, and
the ledger's writer, ``gateway.writer``); pausing and resuming signal the whole tree. It
is *ready* when it logs its ``gateway ready`` line on stderr; a thread reads stderr
throughout (a full pipe would stall the gateway) and keeps the tail for error messages.
Progress is read from its Prometheus counters (``GET /metrics``): a report is counted
there once its batch is committed and acknowledged.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from bench.mqtt import BenchError

READY_LINE = "gateway ready"
TOKEN = "bench-admin-token"
# Seconds between two looks at /metrics while much of a drain remains. Every 50 ms
# before: 20 scrapes a second took 4 % of the gateway's event loop in a drain (py-spy,
# docs/performance.md), where a Prometheus server scrapes every 15 s or so.
SPARSE_POLL = 0.25
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_REPORTS = re.compile(r'^tokenwell_reports_total\{outcome="(\w+)"\} (\S+)$', re.MULTILINE)
_SUMS = re.compile(r"^(tokenwell_\w+_(?:sum|count)(?:\{[^}]*\})?) (\S+)$", re.MULTILINE)


def cpu_seconds_of(stat: Path) -> float:
    """User plus system CPU seconds from a ``/proc/.../stat`` file."""
    fields = stat.read_text().rsplit(")", 1)[1].split()  # the command name may hold spaces
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds used so far by process ``pid`` (all its threads)."""
    return cpu_seconds_of(Path(f"/proc/{pid}/stat"))


def voluntary_switches(status: Path) -> int:
    """``voluntary_ctxt_switches`` from a ``/proc/.../status`` file (0 if unreadable)."""
    with contextlib.suppress(OSError):
        for line in status.read_text().splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    return 0


def waited_seconds(pid: int, thread: int | None = None) -> float:
    """Seconds the threads of process ``pid`` (or only its thread ``thread``) have spent
    runnable but not running, waiting for a CPU: the second field of
    ``/proc/PID/task/TID/schedstat``, in nanoseconds (0 where the kernel keeps no
    scheduler statistics, or the process is gone)."""
    if thread is not None:
        tasks = [Path(f"/proc/{pid}/task/{thread}")]
    else:
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:  # gone
            return 0.0
    waited = 0
    for task in tasks:
        with contextlib.suppress(OSError, IndexError, ValueError):
            waited += int((task / "schedstat").read_text().split()[1])
    return waited / 1e9


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU seconds used so far by each live thread of process ``pid``, by thread id (the
    main thread's id is ``pid``)."""
    used = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            used[int(task.name)] = cpu_seconds_of(task / "stat")
    return used


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants, parents first."""
    tree = [pid]
    for parent in tree:  # grows while it is walked
        with contextlib.suppress(OSError):  # a process that ended meanwhile
            for task in Path(f"/proc/{parent}/task").iterdir():
                tree.extend(int(child) for child in (task / "children").read_text().split())
    return tree


def memory_mib(pid: int, key: str = "VmRSS") -> float:
    """A ``/proc/PID/status`` memory figure in MiB: ``VmRSS`` (resident now) or ``VmHWM``
    (the resident peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"no {key} in /proc/{pid}/status")


def find_process(marker: str) -> int | None:
    """The id of a process whose command line contains ``marker`` (to read its CPU time;
    None when there is none, e.g. a broker in a container)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in command and int(entry.name) != os.getpid():
            return int(entry.name)
    return None


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago (never MQTT's 1883)."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port != 1883:
            return port


class GatewayProcess:
    """A running ``tokenwell gateway``; build it with :func:`run_gateway`."""

    def __init__(self, command: list[str], api: str) -> None:
        self.api = api
        self.started = time.perf_counter()
        self.ready_at = 0.0
        self._ready = threading.Event()
        self._log: deque[str] = deque(maxlen=40)
        env = {**os.environ, "TOKENWELL_TOKEN": TOKEN}
        self.process = subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self._http = httpx.Client(base_url=api, timeout=10)
        self._reader = threading.Thread(target=self._read_log, name="gateway-log", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def startup_seconds(self) -> float:
        """From launching the process to its ready line."""
        return self.ready_at - self.started

    def _read_log(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            if READY_LINE in line and not self._ready.is_set():
                self.ready_at = time.perf_counter()
                self._ready.set()
            self._log.append(line.rstrip())

    def log_tail(self) -> str:
        """The gateway's last log lines."""
        return "\n".join(self._log)

    def wait_ready(self, timeout: float) -> None:
        """Wait for the ready line; raises :class:`BenchError` if the gateway exits first
        or ``timeout`` runs out."""
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            self.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"gateway not ready after {timeout:g} s\n{self.log_tail()}")

    def check_alive(self) -> None:
        """Raise :class:`BenchError` (with the log tail) if the gateway has exited."""
        if self.process.poll() is not None:
            self._reader.join(2)
            code = self.process.returncode
            raise BenchError(f"gateway exited with status {code}\n{self.log_tail()}")

    def pause(self) -> None:
        """Freeze the gateway and its receiver (SIGSTOP): connected, reading nothing."""
        self._signal_tree(signal.SIGSTOP)

    def resume(self) -> None:
        """Let a paused gateway run again (SIGCONT)."""
        self._signal_tree(signal.SIGCONT)

    def _signal_tree(self, signum: int) -> None:
        for pid in process_tree(self.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def cpu_seconds_by_module(self) -> dict[str, float]:
        """CPU seconds of the tree by the module each process runs (``gateway.receiver``,
        ``gateway.writer``; the gateway's own is ``gateway.cli``)."""
        return self._by_module(cpu_seconds)

    def waited_by_module(self) -> dict[str, float]:
        """Seconds the tree's threads have waited for a CPU so far (:func:`waited_seconds`),
        by module as in :meth:`cpu_seconds_by_module`; ``loop`` is the gateway's main
        thread (its event loop) alone."""
        waited = self._by_module(waited_seconds)
        waited["loop"] = waited_seconds(self.pid, self.pid)
        return waited

    def _by_module(self, read: Callable[[int], float]) -> dict[str, float]:
        """``read(pid)`` for each process of the tree, summed by the module it runs
        (processes that ended meanwhile left out)."""
        totals: dict[str, float] = {}
        for pid in process_tree(self.pid):
            with contextlib.suppress(OSError):
                value = read(pid)
                module = self.module_of(pid)
                totals[module] = totals.get(module, 0.0) + value
        return totals

    def module_of(self, pid: int) -> str:
        """The module a process of the tree runs (``python -m MODULE``), "" if none."""
        with contextlib.suppress(OSError):
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"-m" in args[:-1]:
                return args[args.index(b"-m") + 1].decode()
        return ""

    def thread_cpu_seconds(self) -> dict[int, float]:
        """CPU seconds of each thread of the gateway's own process (not its children)."""
        return thread_cpu_seconds(self.pid)

    def loop_blocks(self) -> int:
        """How many times the gateway's main thread (its event loop) has blocked so far:
        its voluntary context switches, i.e. waits with nothing to do (0 if unreadable)."""
        return voluntary_switches(Path(f"/proc/{self.pid}/task/{self.pid}/status"))

    def memory_mib(self, key: str = "VmRSS") -> float:
        """``key`` summed over the tree (for ``VmHWM``, the sum of each process's peak)."""
        return sum(memory_mib(pid, key) for pid in process_tree(self.pid))

    def counted(self) -> dict[str, int]:
        """Reports committed so far, by outcome (``charged``, ``duplicate``, ``rejected``)."""
        return {outcome: int(float(n)) for outcome, n in _REPORTS.findall(self._metrics())}

    def histograms(self) -> dict[str, float]:
        """The ``_sum`` and ``_count`` of every histogram the gateway exports, by name
        and labels (``tokenwell_batch_size_count``, ``tokenwell_commit_seconds_sum``,
        ``tokenwell_stage_seconds_sum{stage="verify"}``, ...)."""
        return {name: float(value) for name, value in _SUMS.findall(self._metrics())}

    def _metrics(self) -> str:
        try:
            return self._http.get("/metrics").raise_for_status().text
        except httpx.HTTPError as exc:
            self.check_alive()
            raise BenchError(f"GET /metrics failed: {exc!r}") from None

    def stop(self, timeout: float = 30) -> float:
        """SIGTERM, wait for a clean exit (SIGKILL after ``timeout``); returns the seconds
        the clean stop took."""
        self._http.close()
        if self.process.poll() is not None:
            return 0.0
        start = time.perf_counter()
        self.resume()  # in case it was paused when a phase failed
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise BenchError(f"gateway ignored SIGTERM for {timeout:g} s") from None
        return time.perf_counter() - start


@contextmanager
def run_gateway(
    broker: str, db: Path, config: Path, *, ready_timeout: float = 120
) -> Iterator[GatewayProcess]:
    """Start a gateway on ``db`` with ``config`` and an admin API on a free port; yield it
    once ready; stop it (SIGTERM, then SIGKILL) however the block ends."""
    port = free_port()
    command = [
        sys.executable, "-m", "gateway.cli", "gateway", "--broker", broker, "--db", str(db),
        "--api", f"127.0.0.1:{port}", "--config", str(config), "--log-level", "INFO",
    ]  # fmt: skip
    gateway = GatewayProcess(command, f"http://127.0.0.1:{port}")
    try:
        gateway.wait_ready(ready_timeout)
        yield gateway
    finally:
        with contextlib.suppress(BenchError):
            gateway.stop()  # a no-op when the phase has stopped it already


def wait_counted(gateway: GatewayProcess, expected: int, timeout: float) -> float:
    """Poll ``/metrics`` until ``expected`` reports are committed; returns when
    (``time.perf_counter()``).

    Polling costs the gateway CPU on its event loop (a scrape, about 1.5 ms of it), so
    it is sparse while much remains (every ``SPARSE_POLL`` seconds) and dense near the
    end (down to every 2 ms), keeping the timing error small.
    """
    deadline = time.monotonic() + timeout
    previous, previous_at = 0, time.perf_counter()
    while True:
        done, now = sum(gateway.counted().values()), time.perf_counter()
        if done >= expected:
            return now
        if time.monotonic() > deadline:
            raise BenchError(f"gateway committed {done} of {expected} in {timeout:g} s")
        rate = (done - previous) / max(now - previous_at, 1e-6)
        eta = (expected - done) / rate if rate > 0 else 1.0
        previous, previous_at = done, now
        time.sleep(min(SPARSE_POLL, max(0.002, eta / 2)))
