"""Worker threads for work that releases the GIL (Ed25519 verification): a batch split
into one chunk a thread, results in the batch's order. Used by the gateway's verify stage
and by the receiver process's vouching."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Workers:
    """A pool of one thread a core, named ``name``."""

    def __init__(self, name: str) -> None:
        self._threads = os.cpu_count() or 2
        self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix=name)

    async def map(
        self, work: Callable[[Sequence[T]], list[R]], items: Sequence[T], *, inline: int
    ) -> list[R]:
        """``work(items)``, split into one chunk a thread; a batch of at most ``inline``
        items runs on the loop instead (handing it to threads costs more than it saves)."""
        if len(items) <= inline:
            return work(items)
        loop = asyncio.get_running_loop()
        step = -(-len(items) // self._threads)
        chunks = [items[i : i + step] for i in range(0, len(items), step)]
        done = await asyncio.gather(*(loop.run_in_executor(self._pool, work, c) for c in chunks))
        return [result for part in done for result in part]

    def close(self) -> None:
        """Stop the threads; work not started is dropped."""
        self._pool.shutdown(wait=False, cancel_futures=True)
