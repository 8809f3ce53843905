"""Hybrid logical clocks: wall-clock milliseconds plus a counter for causality.

A timestamp never goes backwards on one node, even if the wall clock does, and
after observing a remote timestamp the next local one is greater than it, so a
write made after reading someone else's state always wins over it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

MAX_COUNTER = 2**32 - 1


class Timestamp(NamedTuple):
    wall_ms: int
    counter: int


class HybridClock:
    """Issues strictly increasing timestamps; `wall_ms` is injected so tests control time."""

    def __init__(self, wall_ms: Callable[[], int]) -> None:
        self._wall_ms = wall_ms
        self._last = Timestamp(0, 0)

    @property
    def last(self) -> Timestamp:
        return self._last

    def now(self) -> Timestamp:
        wall = self._wall_ms()
        if wall > self._last.wall_ms:
            self._last = Timestamp(wall, 0)
        else:
            self._last = self._bump(self._last.wall_ms, self._last.counter)
        return self._last

    def observe(self, remote: Timestamp) -> None:
        """Move past `remote` so later local timestamps order after it."""
        if remote > self._last:
            self._last = remote

    @staticmethod
    def _bump(wall_ms: int, counter: int) -> Timestamp:
        if counter >= MAX_COUNTER:
            # The counter is a signed field of bounded width; borrowing one
            # millisecond keeps timestamps increasing instead of overflowing.
            return Timestamp(wall_ms + 1, 0)
        return Timestamp(wall_ms, counter + 1)
