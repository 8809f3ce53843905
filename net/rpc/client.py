"""The caller's side of one outbound RPC stream, and the per-call handles."""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import trio

from knexa.net.rpc.call import CallState
from knexa.net.rpc.config import INITIAL_WINDOW
from knexa.net.rpc.envelope import Envelope, Kind, decode_envelope, now_ms
from knexa.net.rpc.errors import CodecError, ErrorCode, RpcError
from knexa.net.rpc.flow import FlowControlError
from knexa.net.rpc.frames import Frame, FrameType
from knexa.net.rpc.schema import PackedBody, pack_body, unpack_body, validate
from knexa.net.rpc.wire import FramedStream

if TYPE_CHECKING:
    from knexa.net.rpc.service import RpcService

log = logging.getLogger(__name__)


def timeout_ms_for(deadline: float) -> int:
    """The remaining time to `deadline` (trio clock) as a wire timeout; 0 = none."""
    if math.isinf(deadline):
        return 0
    return max(1, math.ceil((deadline - trio.current_time()) * 1000))


def error_from(env: Envelope) -> RpcError:
    try:
        message = unpack_body(env.body).get("message", "")
    except Exception:
        message = ""
    return RpcError(ErrorCode.parse(env.status), str(message))


class StreamWriteError(RpcError):
    """A frame could not be written: the stream is dead (its reader may not have noticed yet)."""


class ClientSession:
    def __init__(self, svc: RpcService, fs: FramedStream) -> None:
        self.svc = svc
        self.fs = fs
        self.calls: dict[int, CallState] = {}
        self.closed = False
        self._next_id = 1

    # -- calls -------------------------------------------------------------

    def new_call(self, method: str, *, recv_window: int) -> CallState:
        if self.closed:
            raise RpcError(ErrorCode.UNAVAILABLE, "connection closed")
        call_id = self._next_id
        self._next_id += 1
        call = CallState(call_id, method, send_window=INITIAL_WINDOW, recv_window=recv_window,
                         max_message=self.svc.config.max_message_size)
        self.calls[call_id] = call
        return call

    async def send_signed(self, ftype: FrameType, call: CallState, kind: Kind,
                          body: bytes | PackedBody,
                          *, seq: int = 0, timeout_ms: int = 0, window: int = 0) -> int:
        env = self.svc.seal(kind=kind, method=call.method, call_id=call.call_id, seq=seq,
                            recipient=self.fs.peer_bytes, body=body, timeout_ms=timeout_ms)
        try:
            return await self.fs.send(Frame(ftype, call.call_id, env, window))
        except (trio.Cancelled, RpcError):
            raise
        except Exception as exc:
            raise StreamWriteError(ErrorCode.UNAVAILABLE, f"stream write failed: {exc}") from None

    async def send_credit(self, call: CallState, size: int) -> None:
        grant = call.recv_credit.on_consume(size)
        if grant and not call.terminal_received:
            try:
                await self.fs.send(Frame(FrameType.CREDIT, call.call_id, value=grant))
            except Exception as exc:
                raise StreamWriteError(ErrorCode.UNAVAILABLE, f"stream write failed: {exc}") from None

    async def finish(self, call: CallState) -> None:
        """Forget `call`; if the server may still be working on it, send CANCEL."""
        self.calls.pop(call.call_id, None)
        if call.terminal_received or self.closed:
            return
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + self.svc.config.cancel_grace_s
            try:
                await self.fs.send(Frame(FrameType.CANCEL, call.call_id))
            except Exception:
                pass

    # -- the reader --------------------------------------------------------

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        reason = RpcError(ErrorCode.UNAVAILABLE, "connection closed")
        try:
            reason = await self._read_loop() or reason
        except CodecError as exc:
            reason = RpcError(ErrorCode.PROTOCOL_ERROR, f"bad frame from server: {exc}")
        finally:
            self.closed = True
            for call in self.calls.values():
                call.fail(reason)
            self.svc.drop_client_session(self)
            await self.fs.reset()

    async def _read_loop(self) -> RpcError | None:
        while True:
            got = await self.fs.receive()
            if got is None:
                return None
            frame, size = got
            t = frame.type
            if t is FrameType.CREDIT:
                call = self.calls.get(frame.call_id)
                if call is not None:
                    try:
                        call.grant(frame.value)
                    except FlowControlError as exc:
                        call.fail(RpcError(ErrorCode.PROTOCOL_ERROR, str(exc)))
                continue
            if t not in (FrameType.ITEM, FrameType.RESPONSE):
                return RpcError(ErrorCode.PROTOCOL_ERROR, f"server sent a {t.name} frame")
            if frame.call_id == 0:
                err = self._connection_error(frame)
                if err is not None:
                    return err
                continue
            call = self.calls.get(frame.call_id)
            if call is None:
                continue  # a call we already gave up on
            try:
                env = self._authenticate(frame, call)
                if t is FrameType.ITEM:
                    if env.kind is not Kind.ITEM or env.seq != call.recv_seq + 1:
                        raise RpcError(ErrorCode.PROTOCOL_ERROR, "stream item out of order")
                    call.recv_seq = env.seq
                    call.deliver(env, size, terminal=False)
                else:
                    if env.kind is not Kind.RESPONSE:
                        raise RpcError(ErrorCode.PROTOCOL_ERROR, "response of the wrong kind")
                    call.deliver(env, size, terminal=True)
            except FlowControlError as exc:
                call.fail(RpcError(ErrorCode.PROTOCOL_ERROR, str(exc)))
            except RpcError as err:
                call.fail(err)

    def _authenticate(self, frame: Frame, call: CallState) -> Envelope:
        try:
            env = decode_envelope(frame.envelope)
        except CodecError as exc:
            raise RpcError(ErrorCode.PROTOCOL_ERROR, f"bad envelope from server: {exc}") from None
        self.svc.auth.check(env, self.fs.peer_bytes, now_ms())
        if env.call_id != call.call_id or env.method not in (call.method, ""):
            raise RpcError(ErrorCode.PROTOCOL_ERROR, "response does not match the call")
        return env

    def _connection_error(self, frame: Frame) -> RpcError | None:
        """A signed RESPONSE on call 0: the server is dropping this stream."""
        try:
            env = decode_envelope(frame.envelope)
            self.svc.auth.check(env, self.fs.peer_bytes, now_ms())
        except (CodecError, RpcError):
            return None
        return error_from(env)


class ResponseStream:
    """Server-stream responses: `async for item in responses`."""

    def __init__(self, session: ClientSession, call: CallState, deadline: float,
                 response_model: Any) -> None:
        self._session = session
        self._call = call
        self._deadline = deadline
        self._model = response_model
        self.done = False

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def _next_item(self) -> Envelope | None:
        """The next item's envelope; None at the (successful) end of the stream."""
        if self.done:
            return None
        with trio.move_on_at(self._deadline) as scope:
            env, size = await self._call.next()
        if scope.cancelled_caught:
            raise RpcError(ErrorCode.DEADLINE_EXCEEDED, f"{self._call.method} timed out")
        if env.kind is Kind.RESPONSE:
            self.done = True
            if env.status:
                raise error_from(env)
            return None
        await self._session.send_credit(self._call, size)
        return env

    async def __anext__(self) -> Any:
        env = await self._next_item()
        if env is None:
            raise StopAsyncIteration
        return validate(self._model, unpack_body(env.body), code=ErrorCode.INTERNAL)

    async def raw_items(self) -> AsyncIterator[tuple[bytes, bytes]]:
        """Items as (msgpack body, its verified SHA-256), without schema validation."""
        while (env := await self._next_item()) is not None:
            yield env.body, env.body_sha256


class RequestSink:
    """Client-stream requests: `await sink.send(item)` ... `await sink.finish()`."""

    def __init__(self, session: ClientSession, call: CallState, deadline: float,
                 response_model: Any) -> None:
        self._session = session
        self._call = call
        self._deadline = deadline
        self._model = response_model
        self._closed = False

    async def send(self, item: Any) -> None:
        if self._closed:
            raise RuntimeError("send after finish")
        call = self._call
        body = pack_body(item)
        with trio.move_on_at(self._deadline) as scope:
            try:
                await call.wait_credit()
            except RpcError:
                if call.terminal_received:
                    await self._raise_response()
                raise
            call.send_seq += 1
            size = await self._session.send_signed(FrameType.ITEM, call, Kind.ITEM, body,
                                                   seq=call.send_seq)
            call.send_credit.consume(size)
        if scope.cancelled_caught:
            raise RpcError(ErrorCode.DEADLINE_EXCEEDED, f"{call.method} timed out")

    async def _raise_response(self) -> None:
        env, _ = await self._call.next()
        if env.status:
            raise error_from(env)
        raise RpcError(ErrorCode.CANCELLED, "server answered before the stream ended")

    async def finish(self) -> Any:
        """Half-close the request stream and wait for the response."""
        call = self._call
        with trio.move_on_at(self._deadline) as scope:
            if not self._closed and not call.terminal_received:
                self._closed = True
                await self._session.send_signed(FrameType.CLOSE, call, Kind.CLOSE, b"\xc0",
                                                seq=call.send_seq + 1)
            env, _ = await call.next()
        if scope.cancelled_caught:
            raise RpcError(ErrorCode.DEADLINE_EXCEEDED, f"{call.method} timed out")
        if env.status:
            raise error_from(env)
        return validate(self._model, unpack_body(env.body), code=ErrorCode.INTERNAL)
