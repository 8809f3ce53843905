"""Serving one inbound RPC stream: authenticate, dispatch, stream, respond."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import trio
from libp2p.peer.id import ID as PeerID

from knexa.net.failures import failure_reason
from knexa.net.rpc.call import CallState
from knexa.net.rpc.config import INITIAL_WINDOW, MAX_WINDOW
from knexa.net.rpc.envelope import Envelope, Kind, decode_envelope, now_ms
from knexa.net.rpc.errors import CodecError, ErrorCode, FrameTooLarge, RpcError
from knexa.net.rpc.flow import FlowControlError
from knexa.net.rpc.frames import Frame, FrameType
from knexa.net.rpc.registry import CallKind, MethodSpec
from knexa.net.rpc.schema import PackedBody, dump, pack_body, unpack_body, validate
from knexa.net.rpc.wire import FramedStream, TruncatedFrame

if TYPE_CHECKING:
    from knexa.net.rpc.service import RpcService

log = logging.getLogger(__name__)


class CallContext:
    """What a handler knows about its call; `send` emits server-stream items."""

    def __init__(self, session: ServerSession, call: CallState, spec: MethodSpec,
                 peer_id: PeerID, deadline: float) -> None:
        self._session = session
        self._call = call
        self._spec = spec
        self.peer_id = peer_id
        self.method = spec.name
        self.call_id = call.call_id
        self.deadline = deadline  # trio clock; inf when the caller set none

    async def send(self, item: Any) -> None:
        """Send one server-stream item, waiting for the caller's flow-control credit."""
        if self._spec.kind is not CallKind.SERVER_STREAM:
            raise RuntimeError("ctx.send is only for server_stream handlers")
        body = pack_body(dump(self._spec.response_model, item))
        await self._session.send_item(self._call, body)


class RequestStream:
    """Client-stream items as an async iterator of validated requests."""

    def __init__(self, session: ServerSession, call: CallState, spec: MethodSpec) -> None:
        self._session = session
        self._call = call
        self._spec = spec
        self._done = False

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def _next_item(self) -> Envelope | None:
        if self._done:
            return None
        env, size = await self._call.next()
        if env.kind is Kind.CLOSE:
            self._done = True
            return None
        await self._session.consumed(self._call, size)
        return env

    async def __anext__(self) -> Any:
        env = await self._next_item()
        if env is None:
            raise StopAsyncIteration
        return validate(self._spec.request_model, unpack_body(env.body))

    async def raw_items(self) -> AsyncIterator[tuple[bytes, bytes]]:
        """Items as (msgpack body, its verified SHA-256), without schema validation."""
        while (env := await self._next_item()) is not None:
            yield env.body, env.body_sha256


class ServerSession:
    def __init__(self, svc: RpcService, fs: FramedStream) -> None:
        self.svc = svc
        self.fs = fs
        self.calls: dict[int, CallState] = {}
        self.scope = trio.CancelScope()
        self.closing = False
        self._nursery: trio.Nursery | None = None

    def shutdown(self) -> None:
        """Stop serving: running handlers are cancelled and their callers told so."""
        self.closing = True
        self.scope.cancel()

    # -- frames out -------------------------------------------------------

    async def _send_signed(self, ftype: FrameType, call: CallState | None, call_id: int,
                           method: str, kind: Kind, body: bytes | PackedBody, status: int = 0,
                           seq: int = 0) -> int:
        env = self.svc.seal(kind=kind, method=method, call_id=call_id, seq=seq,
                            recipient=self.fs.peer_bytes, body=body, status=status)
        return await self.fs.send(Frame(ftype, call_id, env))

    async def send_error(self, call_id: int, method: str, err: RpcError) -> None:
        body = pack_body({"message": err.message})
        await self._send_signed(FrameType.RESPONSE, None, call_id, method, Kind.RESPONSE, body,
                                status=int(err.code))
        call = self.calls.get(call_id)
        if call is not None:
            call.responded = True

    async def send_item(self, call: CallState, body: bytes | PackedBody) -> None:
        await call.wait_credit()
        call.send_seq += 1
        size = await self._send_signed(FrameType.ITEM, call, call.call_id, call.method,
                                       Kind.ITEM, body, seq=call.send_seq)
        call.send_credit.consume(size)

    async def consumed(self, call: CallState, size: int) -> None:
        self.svc.release_buffer(self.fs.peer_bytes, size)
        grant = call.recv_credit.on_consume(size)
        if grant:
            await self.fs.send(Frame(FrameType.CREDIT, call.call_id, value=grant))

    # -- the stream ------------------------------------------------------

    async def run(self) -> None:
        with self.scope:
            try:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    if not await self._read_loop():
                        nursery.cancel_scope.cancel()
            finally:
                for call in self.calls.values():
                    call.fail(RpcError(ErrorCode.CANCELLED, "connection closed"))

    async def _read_loop(self) -> bool:
        """Serve frames until the stream ends; False after a fatal protocol error."""
        metrics = self.svc.metrics
        while True:
            try:
                got = await self.fs.receive()
            except FrameTooLarge as exc:
                metrics.record_rejected("too_large")
                return await self._fatal(RpcError(ErrorCode.MESSAGE_TOO_LARGE, str(exc)))
            except TruncatedFrame as exc:
                metrics.record_rejected("truncated")
                return await self._fatal(RpcError(ErrorCode.PROTOCOL_ERROR, str(exc)))
            except CodecError as exc:
                metrics.record_rejected("malformed")
                return await self._fatal(RpcError(ErrorCode.PROTOCOL_ERROR, str(exc)))
            if got is None:
                return True
            frame, size = got
            try:
                await self._on_frame(frame, size)
            except _Fatal as exc:
                return await self._fatal(exc.error)

    async def _fatal(self, err: RpcError) -> bool:
        """Tell the peer why (call id 0) and drop the stream: its framing cannot be trusted."""
        log.info("rpc: dropping stream from %s: %s", self.fs.peer_id, err)
        with trio.move_on_after(self.svc.config.cancel_grace_s):
            try:
                await self.send_error(0, "", err)
            except Exception:
                pass
        await self.fs.reset()
        return False

    def _authenticate(self, frame: Frame, kind: Kind) -> Envelope:
        try:
            env = decode_envelope(frame.envelope)
        except CodecError as exc:
            self.svc.metrics.record_rejected("bad_envelope")
            raise RpcError(ErrorCode.BAD_REQUEST, str(exc)) from None
        try:
            self.svc.auth.check(env, self.fs.peer_bytes, now_ms())
        except RpcError:
            self.svc.metrics.record_rejected("unauthorized")
            raise
        if env.kind is not kind or env.call_id != frame.call_id:
            raise RpcError(ErrorCode.BAD_REQUEST, "envelope does not match its frame")
        return env

    async def _on_frame(self, frame: Frame, size: int) -> None:
        t = frame.type
        if t is FrameType.OPEN:
            try:
                self._open(frame)
            except RpcError as err:
                await self.send_error(frame.call_id, "", err)
            return
        call = self.calls.get(frame.call_id)
        if t is FrameType.CANCEL:
            if call is not None:
                call.cancelled_by_peer = True
                if call.scope is not None:  # else _run_call cancels as soon as it starts
                    call.scope.cancel()
            return
        if t is FrameType.RESPONSE:
            raise _Fatal(RpcError(ErrorCode.PROTOCOL_ERROR, "clients do not send responses"))
        if call is None:
            return  # the call already ended (a race with cancel or a deadline)
        try:
            if t is FrameType.CREDIT:
                call.grant(frame.value)
                return
            kind = Kind.ITEM if t is FrameType.ITEM else Kind.CLOSE
            if not call.accepts_items:
                raise RpcError(ErrorCode.BAD_REQUEST, f"{call.method} does not take a stream")
            env = self._authenticate(frame, kind)
            if env.seq != call.recv_seq + 1:
                raise RpcError(ErrorCode.BAD_REQUEST, f"item {env.seq} out of order")
            call.recv_seq = env.seq
            if kind is Kind.ITEM:
                if not self.svc.reserve_buffer(self.fs.peer_bytes, size):
                    raise RpcError(ErrorCode.OVERLOADED, "too much unconsumed data from this peer")
                try:
                    call.deliver(env, size, terminal=False)
                except FlowControlError:
                    self.svc.release_buffer(self.fs.peer_bytes, size)
                    raise
            else:
                call.deliver(env, size, terminal=True)
        except FlowControlError as exc:
            self._abort(call, RpcError(ErrorCode.PROTOCOL_ERROR, str(exc)))
        except RpcError as err:
            self._abort(call, err)

    def _abort(self, call: CallState, err: RpcError) -> None:
        call.fail(err)
        if call.scope is not None:
            call.scope.cancel()

    def _open(self, frame: Frame) -> None:
        env = self._authenticate(frame, Kind.REQUEST)
        if frame.call_id in self.calls:
            raise RpcError(ErrorCode.BAD_REQUEST, f"call id {frame.call_id} is already in use")
        spec = self.svc.registry.get(env.method)
        if spec is None:
            raise RpcError(ErrorCode.UNKNOWN_METHOD, f"no method {env.method!r}")
        if not self.svc.acquire_slot(self.fs.peer_bytes):
            raise RpcError(ErrorCode.OVERLOADED, "too many concurrent calls from this peer")
        cfg = self.svc.config
        call = CallState(
            frame.call_id, env.method,
            send_window=min(frame.value, MAX_WINDOW),
            recv_window=cfg.stream_window,
            max_message=cfg.max_message_size,
        )
        call.accepts_items = spec.kind is CallKind.CLIENT_STREAM
        self.calls[frame.call_id] = call
        assert self._nursery is not None
        self._nursery.start_soon(self._run_call, call, spec, env)

    async def _run_call(self, call: CallState, spec: MethodSpec, env: Envelope) -> None:
        start = trio.current_time()
        deadline = start + env.timeout_ms / 1000 if env.timeout_ms else float("inf")
        outcome = "ok"
        try:
            with trio.CancelScope(deadline=deadline) as scope:
                call.scope = scope
                if call.cancelled_by_peer or call.error is not None:
                    scope.cancel()
                try:
                    await self._dispatch(call, spec, env, deadline)
                except RpcError as err:
                    outcome = err.code.name.lower()
                    await self.send_error(call.call_id, spec.name, err)
                except Exception as exc:
                    outcome = "internal"
                    # Traceback at debug level; often just a peer that went away mid-reply.
                    log.warning('event=rpc_handler_failed method=%s reason="%s"', spec.name,
                                failure_reason(exc), exc_info=True)
                    await self.send_error(call.call_id, spec.name,
                                          RpcError(ErrorCode.INTERNAL, type(exc).__name__))
            if scope.cancelled_caught:
                if call.cancelled_by_peer:
                    outcome = "cancelled"
                elif call.error is not None:
                    outcome = call.error.code.name.lower()
                    await self._best_effort_error(call, spec, call.error)
                else:
                    outcome = "deadline_exceeded"
                    await self._best_effort_error(
                        call, spec, RpcError(ErrorCode.DEADLINE_EXCEEDED, "handler deadline"))
        finally:
            if self.closing and not call.responded and not call.cancelled_by_peer:
                outcome = "cancelled"
                with trio.CancelScope(shield=True):
                    await self._best_effort_error(
                        call, spec, RpcError(ErrorCode.CANCELLED, "the server is shutting down"))
            self.calls.pop(call.call_id, None)
            self.svc.release_slot(self.fs.peer_bytes)
            if call.recv_credit.buffered:  # items the handler never consumed
                self.svc.release_buffer(self.fs.peer_bytes, call.recv_credit.buffered)
                call.recv_credit.buffered = 0
            self.svc.metrics.record_call("server", spec.name, outcome,
                                         trio.current_time() - start)

    async def _best_effort_error(self, call: CallState, spec: MethodSpec, err: RpcError) -> None:
        with trio.move_on_after(self.svc.config.cancel_grace_s):
            try:
                await self.send_error(call.call_id, spec.name, err)
            except Exception:
                pass

    async def _dispatch(self, call: CallState, spec: MethodSpec, env: Envelope,
                        deadline: float) -> None:
        ctx = CallContext(self, call, spec, self.fs.peer_id, deadline)
        if spec.kind is CallKind.CLIENT_STREAM:
            extra = self.svc.config.stream_window - INITIAL_WINDOW
            call.recv_credit.granted = INITIAL_WINDOW + extra
            if extra > 0:
                await self.fs.send(Frame(FrameType.CREDIT, call.call_id, value=extra))
            result = await spec.handler(RequestStream(self, call, spec), ctx)
        else:
            request = validate(spec.request_model, unpack_body(env.body))
            result = await spec.handler(request, ctx)
            if spec.kind is CallKind.SERVER_STREAM:
                result = None
        try:
            body = pack_body(dump(spec.response_model, result))
        except Exception as exc:
            log.error("rpc handler %s returned an invalid response: %s", spec.name, exc)
            raise RpcError(ErrorCode.INTERNAL, "handler returned an invalid response") from None
        await self._send_signed(FrameType.RESPONSE, call, call.call_id, spec.name,
                                Kind.RESPONSE, body)
        call.responded = True


class _Fatal(Exception):
    def __init__(self, error: RpcError) -> None:
        super().__init__(str(error))
        self.error = error
