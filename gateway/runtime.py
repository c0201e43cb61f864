"""Process settings for the gateway's long-running processes: the garbage collector's
(gateway, receiver) and the scheduling priority of the gateway's event loop.

The collector, measured with the benchmark (docs/performance.md, "Fewer objects, fewer
system calls"): with Python's thresholds (700, 10, 10), charging's short-lived records
ran a young collection a hundred times a second; it promoted the batches in flight, and
the full collections that followed traversed them and the ~70,000 objects the imports
left (the web framework, mostly), 50-70 ms each, two or three times a drain: a stall for
every report waiting, and 250-350 ms of the event loop's time a drain in all; now 100 ms
and no full collection. Higher young thresholds cost less still (20,000: 35 ms) but kept the
start-up's garbage longer: 1,006-1,011 B of resident memory a device at 100,000 devices
against 913-990 B at 5,000 (892-990 B with Python's; the target is 1,024).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import threading
from collections.abc import Iterator

log = logging.getLogger("tokenwell.gateway")
GC_THRESHOLDS = (5_000, 10, 10)
# Nice levels the gateway's event loop runs above the priority it was started with, where
# allowed (root or CAP_SYS_NICE): the loop is the pipeline's one serial stage, and on a
# busy machine it lost the CPU to everything else (1,900 preemptions a second at 6,500
# reports/s, docs/performance.md, "The serial stage first").
LOOP_BOOST = 5


def quiet_collector() -> None:
    """Keep the garbage collector off the hot path: what exists now (call it once the
    imports are done) is frozen out of its sight for good (``gc.freeze``: freed by
    reference counting as ever, only never traversed), and young collections come every
    5,000 net allocations rather than every 700. Cyclic garbage is still collected."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


class _Raised(threading.local):
    """A thread's priority as it was before :func:`raised_priority` raised it, and how
    many of its blocks are open (several gateways may run on one thread: the tests')."""

    before: int | None = None
    depth = 0


_raised = _Raised()


@contextlib.contextmanager
def raised_priority(levels: int) -> Iterator[int]:
    """Run the calling thread ``levels`` nice levels higher for the block, where allowed
    (on Linux a nice value is a thread's; threads and processes it starts meanwhile
    inherit it); back to where it was when the outermost block ends. Yields the nice
    value it had before. Blocks nested or overlapping on one thread raise it once.

    Without the right to raise it (neither root nor ``CAP_SYS_NICE``) the thread keeps
    its priority, and the log says so.
    """
    if _raised.depth == 0:
        _raised.before = os.getpriority(os.PRIO_PROCESS, 0)
        try:
            os.setpriority(os.PRIO_PROCESS, 0, _raised.before - levels)
        except OSError as exc:  # PermissionError without the capability
            log.info("the gateway runs at the priority it was given (%s): give it "
                     "CAP_SYS_NICE to let its pipeline go first under load", exc)  # fmt: skip
    before = _raised.before
    assert before is not None
    _raised.depth += 1
    try:
        yield before
    finally:
        _raised.depth -= 1
        if _raised.depth == 0:
            os.setpriority(os.PRIO_PROCESS, 0, before)  # a lower priority is always allowed
