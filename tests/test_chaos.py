"""Exactly-once charging under SIGKILLs, broker crashes, simulator restarts and cut-offs.

The short runs below are part of every test run. The soak run is for people:
``scripts/test -k soak --soak`` (``TOKENWELL_SOAK_RUNS`` seeds, ``TOKENWELL_SOAK_STEPS``
steps each).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.chaos import Schedule, chaos


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_a_seeded_chaos_run_ends_with_every_balance_exact(
    broker: Any, tmp_path: Path, seed: int
) -> None:
    outcome = await chaos(broker, tmp_path, seed, Schedule(steps=40, devices=10))
    assert outcome.devices_checked == 10
    assert outcome.reports >= 150
    assert outcome.actions["kill_gateway"] >= 1, outcome.actions


@pytest.mark.soak
@pytest.mark.timeout(0)
async def test_soak(broker: Any, tmp_path: Path) -> None:
    runs = int(os.environ.get("TOKENWELL_SOAK_RUNS", "20"))
    steps = int(os.environ.get("TOKENWELL_SOAK_STEPS", "300"))
    for seed in range(1000, 1000 + runs):
        folder = tmp_path / f"seed-{seed}"
        folder.mkdir()
        outcome = await chaos(broker, folder, seed, Schedule(steps=steps, devices=30))
        print(f"seed {seed}: {dict(outcome.actions)} injected={dict(outcome.injected)} "
              f"reports={outcome.reports} devices={outcome.devices_checked}")  # fmt: skip
