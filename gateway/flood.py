"""Flood detection: notice a device that sends far more reports than any schedule would. Pure.

Counts each device's reports over one-second windows (time is an argument) and names a
device the moment it passes ``limit`` in a window, at most once a minute, so the gateway
can report it (a ``flood`` event, a log line, a metric).

Why detection and not dropping: a report can only be judged after its signature is
checked, so skipping some unverified reports of a busy topic would let a forger (or a
replay) push the device's genuine latest report aside. Every report is therefore still
verified and charged; a flooding device costs verification time (about 60 µs a report:
a flood of 1,000 reports a second takes 6 % of one core), and the charging rule makes
its duplicates free. Memory is bounded by the devices seen in the current window.
"""

from __future__ import annotations

from collections.abc import Iterable

WINDOW_MS = 1000
ANNOUNCE_EVERY_WINDOWS = 60


class FloodMonitor:
    """Per-device report counts over one-second windows."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("the per-device report limit must be at least 1 a second")
        self.limit = limit
        self._counts: dict[str, int] = {}
        self._window = -1
        self._announced: set[str] = set()

    def observe(self, devices: Iterable[str], now_ms: int) -> list[str]:
        """Count one report per item of ``devices``, received at ``now_ms``; returns the
        devices that crossed the limit now and were not announced in the last minute."""
        self._roll(now_ms)
        crossed = []
        for device in devices:
            count = self._counts.get(device, 0) + 1
            self._counts[device] = count
            if count == self.limit + 1 and device not in self._announced:
                self._announced.add(device)
                crossed.append(device)
        return crossed

    def _roll(self, now_ms: int) -> None:
        window = now_ms // WINDOW_MS
        if window != self._window:
            self._window = window
            self._counts.clear()
            if window % ANNOUNCE_EVERY_WINDOWS == 0:
                self._announced.clear()
