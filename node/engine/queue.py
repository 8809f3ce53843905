"""The bounded request queue between the trio side and the worker thread; pure code.

Admission never blocks the caller: a full queue raises EngineOverloaded at once so the mesh layer can
send the work elsewhere instead of piling it up (the DMoA stability bound needs bounded queues)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

from .errors import EngineClosed, EngineOverloaded

T = TypeVar("T")


class RequestQueue(Generic[T]):
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("queue capacity must be at least 1")
        self.capacity = capacity
        self._items: deque[T] = deque()
        self._ready = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    def put_nowait(self, item: T) -> None:
        with self._ready:
            if self._closed:
                raise EngineClosed("the engine is shutting down")
            if len(self._items) >= self.capacity:
                raise EngineOverloaded(f"request queue is full ({self.capacity} waiting)")
            self._items.append(item)
            self._ready.notify()

    def take(self, max_items: int, timeout_s: float | None) -> list[T]:
        """Up to max_items items, waiting up to timeout_s for the first one (None: wait until closed or
        an item arrives; 0: do not wait). Returns [] on timeout or once closed and empty."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._ready:
            while not self._items and not self._closed:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return []
                self._ready.wait(remaining)
            taken: list[T] = []
            while self._items and len(taken) < max_items:
                taken.append(self._items.popleft())
            return taken

    def take_where(self, wanted: Callable[[T], bool], max_items: int) -> list[T]:
        """Up to max_items waiting items that `wanted` accepts, oldest first, without waiting; the others
        keep their places. Lets short jobs pass generations that wait for a free batch row."""
        with self._ready:
            taken = [item for item in self._items if wanted(item)][:max_items]
            for item in taken:
                self._items.remove(item)
            return taken

    def close(self) -> list[T]:
        """Refuse new items, wake the taker, and hand back the items that were still waiting."""
        with self._ready:
            self._closed = True
            left = list(self._items)
            self._items.clear()
            self._ready.notify_all()
            return left

    @property
    def closed(self) -> bool:
        return self._closed
