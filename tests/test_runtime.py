"""The interpreter settings of the gateway's processes (gateway/runtime.py), each test in
a fresh interpreter: they are process-wide."""

from __future__ import annotations

import subprocess
import sys

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
