"""Interpreter settings for the gateway's two long-running processes (gateway, receiver).

Measured with the benchmark's drain (docs/performance.md, "The garbage collector"): with
Python's thresholds (700, 10, 10), charging's dozen short-lived records a report ran a
young collection a hundred times a second; it promoted the batches in flight, and the
full collections that followed traversed them and the ~75,000 objects the imports left
(the web framework, mostly), 50-70 ms each, two or three times a drain: a stall for every
report waiting, and 5-10 % of the event loop's time.
"""

from __future__ import annotations

import gc

GC_THRESHOLDS = (20_000, 20, 20)


def quiet_collector() -> None:
    """Keep the garbage collector off the hot path: what exists now (call it once the
    imports are done) is frozen out of its sight for good (``gc.freeze``: freed by
    reference counting as ever, only never traversed), and young collections come every
    20,000 net allocations rather than every 700. Cyclic garbage is still collected."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
