"""The verification floor: how fast this machine checks Ed25519 signatures.

The floor is the signature check alone (over ``DOMAIN + b"\\x00" + body``), on the very
reports the gateway drains, with the envelopes decoded beforehand, with each of the two
libraries the gateway uses: OpenSSL through ``cryptography`` (``Ed25519PublicKey.verify``,
key objects built beforehand: the gateway's full check) and libsodium through PyNaCl
(``crypto_sign_open``: the receiver's strict check, which vouches for almost every report).
Each is measured on one thread, then on all cores (OpenSSL two ways: ``os.cpu_count()``
threads, as both libraries release the GIL while verifying, and as many processes, which
also pay for shipping the work to them; the faster is its all-cores floor). Each figure is
the best of a few rounds: a floor is what the machine *can* do. The ceiling is computed
with libsodium's, the verifier on the gateway's path.

For comparison, :func:`gateway_verify_rate` times the gateway's own per-message check
(``gateway.ingest.verify``: envelope, device lookup, key object, signature, body) on one
thread: the difference from the floor is what the gateway adds per message.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from nacl.bindings import crypto_sign_open

from bench.mqtt import BenchError
from bench.workload import BenchDevice, Signed, provisioned
from gateway.errors import Rejection
from gateway.ingest import Registry, verify
from gateway.wire import USAGE_DOMAIN, UsageReport, decode_envelope, signed_bytes

Check = tuple[bytes, bytes, bytes]  # public key, signature, signed bytes


@dataclass(frozen=True, slots=True)
class VerifyFloor:
    """Signatures verified a second: on one thread, on all cores with threads and with
    processes, and the gateway's full per-message check on one thread."""

    one_core: float
    threads: float
    processes: float
    gateway_one_core: float
    workers: int
    sodium_one_core: float
    sodium_all_cores: float

    @property
    def all_cores(self) -> float:
        """OpenSSL's floor on all cores."""
        return max(self.threads, self.processes)

    @property
    def parallelism(self) -> str:
        return "threads" if self.threads >= self.processes else "processes"


def checks(reports: Sequence[Signed], devices: Sequence[BenchDevice]) -> list[Check]:
    """What verifying each report takes: the device's key, the signature, the signed bytes."""
    keys = {device.id: device.public_key for device in devices}
    result = []
    for report in reports:
        envelope = decode_envelope(report.payload)
        if isinstance(envelope, Rejection):
            raise BenchError(f"benchmark report does not decode: {envelope}")
        data = signed_bytes(USAGE_DOMAIN, envelope.body)
        result.append((keys[report.device], envelope.signature, data))
    return result


def verify_checks(work: Sequence[Check]) -> int:
    """Verify every check (key objects built once per key); returns how many passed."""
    keys: dict[bytes, Ed25519PublicKey] = {}
    passed = 0
    for raw, signature, data in work:
        key = keys.get(raw) or keys.setdefault(raw, Ed25519PublicKey.from_public_bytes(raw))
        key.verify(signature, data)  # raises InvalidSignature: a benchmark bug
        passed += 1
    return passed


def verify_checks_sodium(work: Sequence[Check]) -> int:
    """Verify every check with libsodium; returns how many passed."""
    for raw, signature, data in work:
        crypto_sign_open(signature + data, raw)  # raises BadSignatureError: a benchmark bug
    return len(work)


def _verify_all(
    work: Sequence[Check], check: Callable[[Sequence[Check]], int] = verify_checks
) -> None:
    if check(work) != len(work):
        raise BenchError("a verification went missing")


def _split(work: Sequence[Check], parts: int) -> list[Sequence[Check]]:
    step = -(-len(work) // parts)
    return [work[i : i + step] for i in range(0, len(work), step)]


def _best_rate(count: int, run: Callable[[], None], rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return count / best


def _pooled_rate(
    pool: Executor,
    work: Sequence[Check],
    workers: int,
    rounds: int,
    check: Callable[[Sequence[Check]], int] = verify_checks,
) -> float:
    chunks = _split(work, workers)
    list(pool.map(check, _split(work[: workers * 8], workers)))  # warm every worker

    def run() -> None:
        if sum(pool.map(check, chunks)) != len(work):
            raise BenchError("a verification went missing")

    return _best_rate(len(work), run, rounds)


def threaded_rate(work: Sequence[Check]) -> float:
    """One quick all-cores measurement of libsodium's floor on ``work`` (:func:`checks`;
    threads, one round), for a ceiling measured right beside a drain round (the machine's
    speed drifts)."""
    workers = os.cpu_count() or 1
    with ThreadPoolExecutor(workers) as threads:
        return _pooled_rate(threads, work, workers, 1, verify_checks_sodium)


def gateway_verify_rate(
    reports: Sequence[Signed], devices: Sequence[BenchDevice], rounds: int
) -> float:
    """The gateway's whole per-message check (``gateway.ingest.verify``) on one thread."""
    registry = Registry()
    registry.apply({device.id: provisioned(device, 1, 0)[0] for device in devices})
    items = [(report.device, report.payload) for report in reports]

    def run() -> None:
        for device, payload in items:
            if not isinstance(verify(device, payload, registry), UsageReport):
                raise BenchError(f"the gateway rejects a benchmark report of {device}")

    return _best_rate(len(items), run, rounds)


def measure(
    reports: Sequence[Signed], devices: Sequence[BenchDevice], rounds: int = 3
) -> VerifyFloor:
    """Measure the verification floor on ``reports`` (see the module docstring)."""
    work = checks(reports, devices)
    workers = os.cpu_count() or 1
    one = _best_rate(len(work), lambda: _verify_all(work), rounds)
    sodium_one = _best_rate(len(work), lambda: _verify_all(work, verify_checks_sodium), rounds)
    with ThreadPoolExecutor(workers) as threads:
        threaded = _pooled_rate(threads, work, workers, rounds)
        sodium_all = _pooled_rate(threads, work, workers, rounds, verify_checks_sodium)
    spawn = multiprocessing.get_context("spawn")  # no fork of a threaded process
    with ProcessPoolExecutor(workers, mp_context=spawn) as processes:
        processed = _pooled_rate(processes, work, workers, rounds)
    gateway = gateway_verify_rate(reports, devices, rounds)
    return VerifyFloor(one, threaded, processed, gateway, workers, sodium_one, sodium_all)
