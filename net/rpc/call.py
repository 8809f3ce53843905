"""Per-call state shared by the client and server sides (trio glue over `flow`)."""

from __future__ import annotations

from collections import deque

import trio

from knexa.net.rpc.envelope import Envelope
from knexa.net.rpc.errors import ErrorCode, RpcError
from knexa.net.rpc.flow import RecvCredit, SendCredit


class CallState:
    """Inbox, credit and terminal state of one call on one side.

    The connection's reader task calls `deliver`/`grant`/`fail` (never
    blocking); the task that owns the call awaits `next` and `wait_credit`.
    """

    def __init__(
        self, call_id: int, method: str, *, send_window: int, recv_window: int, max_message: int
    ) -> None:
        self.call_id = call_id
        self.method = method
        self.send_credit = SendCredit(send_window)
        self.recv_credit = RecvCredit(recv_window, max_message)
        self.inbox: deque[tuple[Envelope, int]] = deque()
        self.error: RpcError | None = None
        self.terminal_received = False  # the peer sent its last frame for this call
        self.send_seq = 0
        self.recv_seq = 0
        self.scope: trio.CancelScope | None = None  # server: the handler's scope
        self.cancelled_by_peer = False
        self.responded = False  # server: the final RESPONSE went out
        self.accepts_items = True  # server: only client-stream calls take ITEM/CLOSE frames
        self._changed = trio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def deliver(self, env: Envelope, size: int, *, terminal: bool) -> None:
        """Queue an envelope; flow-controlled items raise `FlowControlError` on overrun."""
        if not terminal:
            self.recv_credit.on_receive(size)
        self.terminal_received = self.terminal_received or terminal
        self.inbox.append((env, size if not terminal else 0))
        self._notify()

    def grant(self, nbytes: int) -> None:
        self.send_credit.grant(nbytes)
        self._notify()

    def fail(self, error: RpcError) -> None:
        if self.error is None:
            self.error = error
        self._notify()

    async def next(self) -> tuple[Envelope, int]:
        """The next envelope and its flow-controlled size (0 for terminal ones)."""
        while not self.inbox:
            if self.error is not None:
                raise self.error
            await self._changed.wait()
        return self.inbox.popleft()

    async def wait_credit(self) -> None:
        while not self.send_credit.can_send():
            if self.error is not None:
                raise self.error
            if self.terminal_received:
                raise RpcError(ErrorCode.CANCELLED, "the peer ended the call")
            await self._changed.wait()
        if self.error is not None:
            raise self.error
