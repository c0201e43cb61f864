"""Sampling the gateway with py-spy during a drain, and summarising where its time goes.

``py-spy record --format raw --subprocesses`` writes one line per distinct stack:
``process PID:"COMMAND";`` for the process and each parent, ``thread (TID): NAME;``, then
the frames, outermost first, each ``function (file:line)``, then the sample count. A
thread is named after its process's module (``gateway.cli``, ``gateway.receiver``).
Idle samples are left out, so every sample is CPU time (or time holding the GIL
waiting on a system call that py-spy does not count as idle). :func:`summarise` adds them
up three ways: by thread, by function where the sample landed (self), and by function
anywhere on the stack (inclusive).
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.mqtt import BenchError

_THREAD = re.compile(r"thread \(\w+\): ?(.*)")
_PROCESS = re.compile(r'process \d+:"[^"]*?-m (\S+)')
_LINE_NUMBER = re.compile(r":\d+\)$")


def py_spy() -> str:
    """The py-spy executable (beside this Python, else on PATH); BenchError if missing."""
    beside = Path(sys.executable).with_name("py-spy")
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if found is None:
        raise BenchError("--profile needs py-spy: pip install py-spy")
    return found


def gil_profile(out: Path) -> Path:
    """Where :func:`profiling` writes the GIL holder's samples, beside ``out``."""
    return out.with_name(f"{out.stem}.gil{out.suffix}")


@contextmanager
def profiling(pid: int, out: Path, rate: int = 250) -> Iterator[None]:
    """Sample process ``pid`` until the block ends, twice over: every thread that is not
    idle into ``out``, and only the thread holding the GIL into :func:`gil_profile`.

    A thread waiting for the GIL is not idle to py-spy, so the first profile shows where
    threads *are*; the second shows what serialises them. ``--nonblocking``: py-spy reads
    the stacks without pausing the gateway, so the profiled run is barely slowed.
    """
    samplers = [_sample(pid, out, rate), _sample(pid, gil_profile(out), rate, "--gil")]
    time.sleep(0.2)  # py-spy attaches; there is no signal for it
    try:
        yield
    finally:
        for sampler, path in zip(samplers, (out, gil_profile(out)), strict=True):
            _stop(sampler, path)


def _sample(pid: int, out: Path, rate: int, *extra: str) -> subprocess.Popen[bytes]:
    command = [
        py_spy(), "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw",
        "--output", str(out), "--nonblocking", "--threads", "--subprocesses", *extra,
    ]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _stop(sampler: subprocess.Popen[bytes], out: Path) -> None:
    sampler.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
    try:
        _, errors = sampler.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        sampler.kill()
        raise BenchError("py-spy did not stop") from None
    if not out.exists():
        raise BenchError(f"py-spy wrote no profile {out}: {errors.decode()[-500:]}")


def _frames(line: str) -> tuple[str, list[str], int]:
    stack, _, count = line.rpartition(" ")
    first, *frames = stack.split(";")
    process = ""
    while first.startswith("process ") and frames:  # the innermost process names it
        named = _PROCESS.match(first)
        process = f"{named.group(1)} " if named else process
        first, *frames = frames
    match = _THREAD.match(first)
    thread = re.sub(r"[_-]?\d+$", "", match.group(1)) if match else first
    name = process + (thread or "?")
    return name, [_LINE_NUMBER.sub(")", frame) for frame in frames], int(count)


def summarise(raw: Path, top: int = 15) -> str:
    """A readable summary of a raw py-spy profile: shares by thread, self and inclusive."""
    threads: Counter[str] = Counter()
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        if not line.strip():
            continue
        thread, frames, count = _frames(line)
        threads[thread] += count
        if frames:
            own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    total = sum(threads.values()) or 1
    parts = [f"{total} samples", _share("by thread", threads, total, top)]
    parts += [_share("self", own, total, top), _share("inclusive", inclusive, total, top)]
    return "\n".join(parts)


def _share(title: str, counts: Counter[str], total: int, top: int) -> str:
    rows = [f"  {100 * n / total:5.1f}%  {name}" for name, n in counts.most_common(top)]
    return "\n".join([f"{title}:", *rows])
