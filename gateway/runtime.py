"""Interpreter settings for the gateway's two long-running processes (gateway, receiver).

Measured with the benchmark (docs/performance.md, "Fewer objects, fewer system calls"):
with Python's thresholds (700, 10, 10), charging's short-lived records ran a young
collection a hundred times a second; it promoted the batches in flight, and the full
collections that followed traversed them and the ~70,000 objects the imports left (the
web framework, mostly), 50-70 ms each, two or three times a drain: a stall for every
report waiting, and 250-350 ms of the event loop's time a drain in all; now 100 ms and
no full collection. Higher young thresholds cost less still (20,000: 35 ms) but kept the
start-up's garbage longer: 1,006-1,011 B of resident memory a device at 100,000 devices
against 913-990 B at 5,000 (892-990 B with Python's; the target is 1,024).
"""

from __future__ import annotations

import gc

GC_THRESHOLDS = (5_000, 10, 10)


def quiet_collector() -> None:
    """Keep the garbage collector off the hot path: what exists now (call it once the
    imports are done) is frozen out of its sight for good (``gc.freeze``: freed by
    reference counting as ever, only never traversed), and young collections come every
    5,000 net allocations rather than every 700. Cyclic garbage is still collected."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
