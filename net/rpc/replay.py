"""A bounded replay cache for signed-message nonces (sans-IO)."""

from __future__ import annotations

import heapq


class ReplayCache:
    """Remembers (sender, nonce) pairs whose timestamps lie inside the skew window.

    Messages older than the window are rejected by the timestamp check, so
    entries can be forgotten once they leave it. When the cache is full the
    oldest entry is evicted and its timestamp becomes a floor: anything at or
    below the floor is refused, so eviction can never re-open a replay.
    """

    def __init__(self, window_ms: int, max_entries: int = 100_000) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be positive")
        self.window_ms = window_ms
        self.max_entries = max_entries
        self.floor_ms = -(2**63)
        self._seen: set[bytes] = set()
        self._heap: list[tuple[int, bytes]] = []

    def __len__(self) -> int:
        return len(self._seen)

    def _expire(self, now_ms: int) -> None:
        horizon = now_ms - self.window_ms
        heap = self._heap
        while heap and heap[0][0] < horizon:
            _, key = heapq.heappop(heap)
            self._seen.discard(key)

    def check_and_add(self, key: bytes, ts_ms: int, now_ms: int) -> bool:
        """True if `key` is fresh (and now remembered); False for a replay."""
        self._expire(now_ms)
        if ts_ms <= self.floor_ms or key in self._seen:
            return False
        self._seen.add(key)
        heapq.heappush(self._heap, (ts_ms, key))
        while len(self._heap) > self.max_entries:
            ts, old = heapq.heappop(self._heap)
            self._seen.discard(old)
            self.floor_ms = max(self.floor_ms, ts)
        return True
