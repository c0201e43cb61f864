"""The process settings of the gateway's processes (gateway/runtime.py): the collector's,
each test in a fresh interpreter (they are process-wide), and the event loop's priority."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading

import pytest

from gateway.runtime import raised_priority
from tests.helpers import may_raise_priority

QUIETED = """
import gc, weakref
from gateway.runtime import GC_THRESHOLDS, quiet_collector
quiet_collector()
print(gc.get_freeze_count())
class Node: pass
node = Node(); node.me = node; ref = weakref.ref(node); del node
kept = [[] for _ in range(2 * GC_THRESHOLDS[0])]  # enough for a young collection
print(ref() is None)
"""


def test_what_the_imports_left_is_frozen_and_cyclic_garbage_is_still_collected() -> None:
    done = subprocess.run(
        [sys.executable, "-c", QUIETED], capture_output=True, text=True, check=True, timeout=60
    )
    frozen, collected = done.stdout.split()
    assert int(frozen) > 1000  # the interpreter's and gateway.runtime's own objects
    assert collected == "True"


@pytest.mark.skipif(not may_raise_priority(3), reason="not allowed to raise a priority here")
def test_the_block_runs_the_thread_higher_once_however_nested_and_restores_it() -> None:
    before = os.getpriority(os.PRIO_PROCESS, 0)
    seen: list[int] = []
    with raised_priority(3) as started:
        assert started == before
        assert os.getpriority(os.PRIO_PROCESS, 0) == before - 3
        with raised_priority(3) as nested:  # a second gateway on the same thread
            assert nested == before
            assert os.getpriority(os.PRIO_PROCESS, 0) == before - 3
        assert os.getpriority(os.PRIO_PROCESS, 0) == before - 3  # the outer block still runs
        thread = threading.Thread(target=lambda: seen.append(os.getpriority(os.PRIO_PROCESS, 0)))
        thread.start()
        thread.join()
    assert seen == [before - 3]  # a thread started meanwhile inherits it
    assert os.getpriority(os.PRIO_PROCESS, 0) == before


def test_without_the_right_to_raise_it_the_thread_keeps_its_priority(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = os.setpriority

    def only_lower(which: int, who: int, priority: int) -> None:
        if priority < os.getpriority(which, who):
            raise PermissionError(13, "Permission denied")
        real(which, who, priority)

    monkeypatch.setattr(os, "setpriority", only_lower)
    before = os.getpriority(os.PRIO_PROCESS, 0)
    with caplog.at_level(logging.INFO, logger="tokenwell.gateway"), raised_priority(5) as started:
        assert started == before
        assert os.getpriority(os.PRIO_PROCESS, 0) == before
    assert os.getpriority(os.PRIO_PROCESS, 0) == before
    assert "CAP_SYS_NICE" in caplog.text
