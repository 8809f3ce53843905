"""`RpcService`: the node's signed RPC endpoint (server and client in one)."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio
from libp2p.abc import IHost, INetStream
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID as PeerID
from prometheus_client.registry import Collector, CollectorRegistry

from knexa.net.rpc.auth import EnvelopeAuthenticator
from knexa.net.rpc.call import CallState
from knexa.net.rpc.client import (
    ClientSession,
    RequestSink,
    ResponseStream,
    StreamWriteError,
    error_from,
    timeout_ms_for,
)
from knexa.net.rpc.config import PROTOCOL_ID, RpcConfig
from knexa.net.rpc.envelope import Kind, seal
from knexa.net.rpc.errors import ErrorCode, RpcError
from knexa.net.rpc.frames import FrameType
from knexa.net.rpc.metrics import RpcMetrics
from knexa.net.rpc.registry import CallKind, MethodRegistry, MethodSpec
from knexa.net.rpc.schema import PackedBody, pack_body, unpack_body, validate
from knexa.net.rpc.server import ServerSession
from knexa.net.rpc.wire import FramedStream
from knexa.net.rpc.yamux_tuning import configure_process

log = logging.getLogger(__name__)


class RpcService:
    """Serves registered methods on `PROTOCOL_ID` and calls methods on other peers.

    Run it with ``await nursery.start(service.run)`` or ``async with service.running():``
    inside a started host.
    """

    def __init__(
        self,
        host: IHost,
        key_pair: KeyPair,
        *,
        max_message_size: int = RpcConfig.max_message_size,
        skew_s: float = RpcConfig.skew_s,
        max_concurrent_per_peer: int = RpcConfig.max_concurrent_per_peer,
        config: RpcConfig | None = None,
        metrics: RpcMetrics | None = None,
        protocol_id: str = PROTOCOL_ID,
    ) -> None:
        self.host = host
        self.key_pair = key_pair
        self.config = config or RpcConfig(
            max_message_size=max_message_size,
            skew_s=skew_s,
            max_concurrent_per_peer=max_concurrent_per_peer,
        )
        self.protocol_id = protocol_id
        self.peer_id: PeerID = PeerID.from_pubkey(key_pair.public_key)
        self._peer_bytes = self.peer_id.to_bytes()
        if host.get_id() != self.peer_id:
            raise ValueError("key_pair is not the host's identity")
        self.metrics = metrics or RpcMetrics()
        self.registry = MethodRegistry()
        self.auth = EnvelopeAuthenticator(
            self._peer_bytes,
            skew_ms=int(self.config.skew_s * 1000),
            replay_cache_size=self.config.replay_cache_size,
        )
        self._active: defaultdict[bytes, int] = defaultdict(int)
        self._buffered: defaultdict[bytes, int] = defaultdict(int)
        self._inbound: defaultdict[bytes, int] = defaultdict(int)
        self._server_sessions: set[ServerSession] = set()
        self._clients: defaultdict[PeerID, list[ClientSession]] = defaultdict(list)
        self._dial_locks: defaultdict[PeerID, trio.Lock] = defaultdict(trio.Lock)
        self._nursery: trio.Nursery | None = None
        # Called before dialing a peer that is not connected, e.g. to look its
        # addresses up in the DHT; it may connect the peer itself.
        self.resolve_peer: Callable[[PeerID], Awaitable[None]] | None = None

    # -- registration ------------------------------------------------------

    def register(
        self,
        method: str,
        handler: Callable[..., Any],
        request_model: Any = None,
        response_model: Any = None,
        kind: CallKind | str = CallKind.UNARY,
    ) -> None:
        """Serve `method` with `handler` (see `MethodSpec` for the handler signatures)."""
        self.registry.register(
            MethodSpec(method, handler, CallKind(kind), request_model, response_model)
        )

    def register_metrics(self, registry: CollectorRegistry) -> Collector:
        return self.metrics.register(registry)

    # -- lifecycle ---------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Install the stream handler and serve until cancelled."""
        if self._nursery is not None:
            raise RuntimeError("RpcService is already running")
        configure_process()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self.host.set_stream_handler(self.protocol_id, self._handle_stream)
                task_status.started()
                await trio.sleep_forever()
        finally:
            # The handler stays installed and resets streams once _nursery is
            # None: py-libp2p raises KeyError into the host's own task group when
            # a negotiation races with remove_stream_handler.
            self._nursery = None
            for session in list(self._server_sessions):
                session.shutdown()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[RpcService]:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.run)
            try:
                yield self
            finally:
                nursery.cancel_scope.cancel()

    # -- server side -------------------------------------------------------

    def seal(self, *, kind: Kind, method: str, call_id: int, seq: int, recipient: bytes,
             body: bytes | PackedBody, status: int = 0, timeout_ms: int = 0) -> bytes:
        return seal(self.key_pair, kind=kind, method=method, call_id=call_id, seq=seq,
                    sender=self._peer_bytes, recipient=recipient, body=body, status=status,
                    timeout_ms=timeout_ms)

    def acquire_slot(self, peer: bytes) -> bool:
        if self._active[peer] >= self.config.max_concurrent_per_peer:
            return False
        self._active[peer] += 1
        return True

    def reserve_buffer(self, peer: bytes, nbytes: int) -> bool:
        if self._buffered[peer] + nbytes > self.config.max_buffered_per_peer:
            return False
        self._buffered[peer] += nbytes
        return True

    def release_buffer(self, peer: bytes, nbytes: int) -> None:
        self._buffered[peer] -= nbytes
        if self._buffered[peer] <= 0:
            del self._buffered[peer]

    def release_slot(self, peer: bytes) -> None:
        self._active[peer] -= 1
        if self._active[peer] <= 0:
            del self._active[peer]

    async def _handle_stream(self, stream: INetStream) -> None:
        fs = FramedStream(stream, self.config.max_message_size, self.metrics)
        peer = fs.peer_bytes
        if self._nursery is None or self._inbound[peer] >= self.config.max_streams_per_peer:
            self.metrics.record_rejected("stream_limit")
            await fs.reset()
            return
        self._inbound[peer] += 1
        session = ServerSession(self, fs)
        self._server_sessions.add(session)
        try:
            await fs.start()
            await session.run()
        finally:
            self._server_sessions.discard(session)
            self._inbound[peer] -= 1
            if not self._inbound[peer]:
                del self._inbound[peer]
            await fs.close()

    # -- client side -------------------------------------------------------

    def drop_client_session(self, session: ClientSession) -> None:
        pool = self._clients.get(session.fs.peer_id)
        if pool and session in pool:
            pool.remove(session)

    def retire_sessions(self, peer_id: PeerID) -> int:
        """Later calls to `peer_id` open a new stream, which the swarm puts on its best connection
        (a direct one that replaced a relayed one); calls in flight finish on their old stream."""
        return len(self._clients.pop(peer_id, []))

    def session_paths(self, peer_id: PeerID) -> list[str]:
        """Transport addresses of the connections that carry our call streams to `peer_id`."""
        paths: list[str] = []
        for session in self._clients.get(peer_id, []):
            get_addrs = getattr(session.fs.stream.muxed_conn, "get_transport_addresses", None)
            for addr in (get_addrs() or []) if get_addrs is not None else []:
                if str(addr) not in paths:
                    paths.append(str(addr))
        return paths

    async def _session(self, peer_id: PeerID) -> ClientSession:
        pool = self._clients[peer_id]
        best = min(pool, key=lambda s: len(s.calls), default=None)
        if best is not None and (len(best.calls) < self.config.calls_per_stream
                                 or len(pool) >= self.config.streams_per_peer):
            return best
        async with self._dial_locks[peer_id]:
            pool = self._clients[peer_id]
            if pool and len(pool) >= self.config.streams_per_peer:
                return min(pool, key=lambda s: len(s.calls))
            if self._nursery is None:
                raise RpcError(ErrorCode.UNAVAILABLE, "RpcService is not running")
            if self.resolve_peer is not None and not self.host.get_network().get_connections(peer_id):
                try:
                    await self.resolve_peer(peer_id)
                except trio.Cancelled:
                    raise
                except Exception as exc:
                    raise RpcError(ErrorCode.UNAVAILABLE, f"cannot reach {peer_id}: {exc}") from None
            try:
                stream = await self.host.new_stream(peer_id, [self.protocol_id])
            except trio.Cancelled:
                raise
            except Exception as exc:
                raise RpcError(ErrorCode.UNAVAILABLE,
                               f"cannot open an RPC stream to {peer_id}: {exc}") from None
            fs = FramedStream(stream, self.config.max_message_size, self.metrics)
            await fs.start()
            session = ClientSession(self, fs)
            await self._nursery.start(session.run)
            pool.append(session)
            return session

    async def _open_call(self, peer_id: PeerID, method: str, body: bytes | PackedBody, deadline: float,
                         recv_window: int, open_window: int) -> tuple[ClientSession, CallState]:
        """A session and a call whose OPEN frame went out. A pooled stream can be dead before its reader has
        noticed (its connection just closed); an OPEN frame that could not be written started nothing on the
        server, so the call is opened once more, on a fresh stream."""
        try:
            return await self._open_once(peer_id, method, body, deadline, recv_window, open_window)
        except StreamWriteError:
            return await self._open_once(peer_id, method, body, deadline, recv_window, open_window)

    async def _open_once(self, peer_id: PeerID, method: str, body: bytes | PackedBody, deadline: float,
                         recv_window: int, open_window: int) -> tuple[ClientSession, CallState]:
        session = await self._session(peer_id)
        call = session.new_call(method, recv_window=recv_window)
        try:
            await session.send_signed(FrameType.OPEN, call, Kind.REQUEST, body,
                                      timeout_ms=timeout_ms_for(deadline), window=open_window)
        except BaseException as exc:
            await session.finish(call)
            if isinstance(exc, StreamWriteError):  # the stream is dead: no later call may pick it from the pool
                session.closed = True
                self.drop_client_session(session)
            raise
        return session, call

    def _deadline(self, timeout: float | None) -> float:
        deadline = trio.current_effective_deadline()
        if timeout is not None:
            deadline = min(deadline, trio.current_time() + timeout)
        return deadline

    async def call(
        self,
        peer_id: PeerID,
        method: str,
        body: Any = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
        response_model: Any = None,
    ) -> Any:
        """One unary call; returns the (validated) response or raises `RpcError`."""
        start = trio.current_time()
        deadline = self._deadline(timeout)
        outcome = "cancelled"
        try:
            with trio.move_on_at(deadline) as scope:
                session, call = await self._open_call(peer_id, method, pack_body(body), deadline,
                                                      self.config.stream_window, self.config.stream_window)
                try:
                    env, _ = await call.next()
                finally:
                    await session.finish(call)
            if scope.cancelled_caught:
                raise RpcError(ErrorCode.DEADLINE_EXCEEDED, f"{method} timed out")
            if env.kind is not Kind.RESPONSE:
                raise RpcError(ErrorCode.PROTOCOL_ERROR, "stream item in answer to a unary call")
            if env.status:
                raise error_from(env)
            result = validate(response_model, unpack_body(env.body), code=ErrorCode.INTERNAL)
            outcome = "ok"
            return result
        except RpcError as err:
            outcome = err.code.name.lower()
            raise
        finally:
            self.metrics.record_call("client", method, outcome, trio.current_time() - start)

    @asynccontextmanager
    async def server_stream(
        self,
        peer_id: PeerID,
        method: str,
        body: Any = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
        response_model: Any = None,
        window: int | None = None,
    ) -> AsyncIterator[ResponseStream]:
        """``async with svc.server_stream(peer, m, body) as responses: async for r in responses``.

        The deadline bounds every wait for a response; leaving the block before
        the stream ended cancels the call on the server.
        """
        start = trio.current_time()
        deadline = self._deadline(timeout)
        window = window or self.config.stream_window
        outcome = "cancelled"
        with trio.move_on_at(deadline) as scope:
            session, call = await self._open_call(peer_id, method, pack_body(body), deadline, window, window)
        if scope.cancelled_caught:
            raise RpcError(ErrorCode.DEADLINE_EXCEEDED, f"{method} timed out")
        try:
            responses = ResponseStream(session, call, deadline, response_model)
            yield responses
            outcome = "ok" if responses.done else "cancelled"
        except RpcError as err:
            outcome = err.code.name.lower()
            raise
        finally:
            await session.finish(call)
            self.metrics.record_call("client", method, outcome, trio.current_time() - start)

    @asynccontextmanager
    async def client_stream(
        self,
        peer_id: PeerID,
        method: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
        response_model: Any = None,
    ) -> AsyncIterator[RequestSink]:
        """``async with svc.client_stream(peer, m) as sink:``, then ``await sink.finish()``."""
        start = trio.current_time()
        deadline = self._deadline(timeout)
        outcome = "cancelled"
        with trio.move_on_at(deadline) as scope:
            session, call = await self._open_call(peer_id, method, pack_body(None), deadline,
                                                  self.config.stream_window, 0)
        if scope.cancelled_caught:
            raise RpcError(ErrorCode.DEADLINE_EXCEEDED, f"{method} timed out")
        try:
            sink = RequestSink(session, call, deadline, response_model)
            yield sink
            outcome = "ok" if call.terminal_received else "cancelled"
        except RpcError as err:
            outcome = err.code.name.lower()
            raise
        finally:
            await session.finish(call)
            self.metrics.record_call("client", method, outcome, trio.current_time() - start)
