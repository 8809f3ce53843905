"""Credit-based flow control for one direction of one call (sans-IO).

The receiver grants bytes of credit; the sender may send a message whenever
its credit is positive (so it overshoots by at most one message). The
receiver therefore buffers at most `window + max_message` bytes per call, and
a slow reader stalls its own sender instead of making anyone buffer without
bound.
"""

from __future__ import annotations


class FlowControlError(Exception):
    """The peer sent more than it was granted, or granted absurd credit."""


class SendCredit:
    def __init__(self, initial: int, *, limit: int = 2**40) -> None:
        self.available = initial
        self._limit = limit

    def can_send(self) -> bool:
        return self.available > 0

    def consume(self, nbytes: int) -> None:
        self.available -= nbytes

    def grant(self, nbytes: int) -> None:
        if nbytes <= 0 or self.available + nbytes > self._limit:
            raise FlowControlError(f"invalid credit grant of {nbytes} bytes")
        self.available += nbytes


class RecvCredit:
    """Tracks what the peer may still send and when to grant more."""

    def __init__(self, window: int, max_message: int) -> None:
        self.window = window
        self.max_message = max_message
        self.granted = window  # credit the sender still holds, as we see it
        self.buffered = 0  # received, not yet consumed by the application
        self._unreported = 0  # consumed but not yet granted back

    def on_receive(self, nbytes: int) -> None:
        if self.granted <= 0:
            raise FlowControlError("message received without credit")
        self.granted -= nbytes
        self.buffered += nbytes
        if self.granted < -self.max_message:
            raise FlowControlError("message overshoots the granted credit")

    def on_consume(self, nbytes: int) -> int:
        """Record that the application took `nbytes`; return credit to grant now (or 0)."""
        self.buffered -= nbytes
        self._unreported += nbytes
        if self._unreported >= self.window // 2:
            grant, self._unreported = self._unreported, 0
            self.granted += grant
            return grant
        return 0
