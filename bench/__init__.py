"""Tokenwell's benchmark: ``python -m bench`` (method and results: docs/performance.md).

One run measures, on the same pre-signed reports through a real Mosquitto:

- the floors: Ed25519 verification on one core and on all cores (:mod:`bench.verify`),
  and a bare paho subscriber draining the backlog (:func:`bench.mqtt.drain_bare`);
- the gateway, as its own process (:mod:`bench.procs`), draining the same backlog to
  committed charges, as a ratio to the ceiling the floors allow (:mod:`bench.report`);
- latency at half that rate, memory per device and start-up with many devices
  (:mod:`bench.phases`).

Modules: :mod:`bench.workload` (devices, reports, ledger), :mod:`bench.mqtt` (the
benchmark's own MQTT clients), :mod:`bench.procs` (the gateway process),
:mod:`bench.phases` (the timed phases), :mod:`bench.profile` (py-spy),
:mod:`bench.report` (results, JSON, table), :mod:`bench.cli` (the command line).
"""
