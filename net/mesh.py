"""The node's view of the libp2p mesh: connections, RTTs, agents, bootstrap links."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import multiaddr
import trio
from libp2p.abc import IHost, INetConn, INetStream
from libp2p.host.ping import ID as PING_PROTOCOL
from libp2p.identity.identify.identify import ID as IDENTIFY_PROTOCOL
from libp2p.identity.identify.pb.identify_pb2 import Identify
from libp2p.peer.id import ID as PeerID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.utils.varint import read_length_prefixed_protobuf

from knexa.net.backoff import Backoff
from knexa.net.failures import failure_reason
from knexa.net.notifee import ConnectionNotifee
from knexa.net.peers import PeerConnection, PeerTable, connection_kind

log = logging.getLogger("knexa.mesh")

PING_SIZE = 32
DIAL_TIMEOUT_S = 5.0
IDENTIFY_TIMEOUT_S = 5.0
# Ping intervals a peer may stay in the table with no connection in the swarm before the mesh drops it.
UNLINKED_GRACE_PINGS = 3
# Pings per second a node sends in all: with many peers each is pinged less often, so a
# large mesh does not spend its CPU on RTT probes (a ping costs about a pubsub message).
MAX_PINGS_PER_S = 2.0


def ping_interval(base_s: float, peers: int) -> float:
    """Seconds between pings to one peer: `base_s`, stretched so all peers together get at most
    MAX_PINGS_PER_S."""
    return max(base_s, peers / MAX_PINGS_PER_S)


@dataclass
class _ConnEvent:
    up: bool
    conn: INetConn


def _post(send: trio.MemorySendChannel[_ConnEvent], event: _ConnEvent) -> None:
    try:
        send.send_nowait(event)
    except trio.WouldBlock:
        log.warning("event=conn_event_dropped reason=queue_full")
    except (trio.ClosedResourceError, trio.BrokenResourceError):
        pass  # the mesh is shutting down


def _describe(conn: INetConn) -> tuple[str, str]:
    addrs = conn.get_transport_addresses()
    address = str(addrs[0]) if addrs else "unknown"
    direction = str(getattr(conn, "direction", "unknown")).lower()
    return address, direction.rsplit(".", 1)[-1]


class Mesh:
    """Tracks connected peers and keeps the links to bootstrap peers up.

    Run it inside the host's lifetime: `await nursery.start(mesh.run)`.
    """

    def __init__(
        self,
        host: IHost,
        bootstrap: Sequence[multiaddr.Multiaddr] = (),
        *,
        ping_interval_s: float = 5.0,
    ) -> None:
        self.host = host
        self.bootstrap = list(bootstrap)
        self.ping_interval_s = ping_interval_s
        self.table = PeerTable()
        self.connects = 0
        self.disconnects = 0
        self._peer_scopes: dict[str, trio.CancelScope] = {}
        self._peer_gone: dict[str, trio.Event] = {}
        self._nursery: trio.Nursery | None = None
        # Called with the peer id of each newly connected peer (must not block).
        self.connect_listeners: list[Callable[[str], None]] = []
        # Called with the peer id when a direct connection replaces a relayed one (must not block).
        self.upgrade_listeners: list[Callable[[str], None]] = []

    # -- queries ---------------------------------------------------------
    def peers(self) -> list[PeerConnection]:
        return self.table.snapshot()

    def streams_open(self) -> int:
        return sum(
            len(c.get_streams()) for c in self.host.get_network().get_connections()
        )

    def observed_addrs(self) -> list[str]:
        """Our own addresses as peers reported seeing them through identify."""
        manager = getattr(self.host, "_observed_addr_manager", None)
        if manager is None:
            return []
        try:
            return [str(a) for a in manager.addrs(min_observers=1)]
        except Exception:  # observed-address bookkeeping is best effort
            return []

    # -- lifecycle -------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        send, receive = trio.open_memory_channel[_ConnEvent](1024)
        # The swarm awaits notifees inline: hand events to the mesh's own task.
        notifee = ConnectionNotifee(
            lambda conn: _post(send, _ConnEvent(True, conn)),
            lambda conn: _post(send, _ConnEvent(False, conn)),
        )
        network = self.host.get_network()
        network.register_notifee(notifee)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for conn in network.get_connections():
                    self._on_up(conn)
                nursery.start_soon(self._consume, receive)
                for addr in self.bootstrap:
                    nursery.start_soon(self._keep_bootstrap_link, addr)
                task_status.started()
        finally:
            self._nursery = None
            remove = getattr(network, "remove_notifee", None)
            if remove is not None:
                remove(notifee)
            send.close()

    async def connect(self, addr: multiaddr.Multiaddr, timeout_s: float = DIAL_TIMEOUT_S) -> str:
        """Dial a /p2p multiaddr; returns the peer id. Raises ConnectionError."""
        info = info_from_p2p_addr(addr)
        # Our own backoff decides when to retry; the swarm's negative cache would
        # otherwise refuse redials to a peer that failed once for a whole minute.
        network = self.host.get_network()
        if hasattr(network, "unblock_peer"):
            network.unblock_peer(info.peer_id)
        with trio.move_on_after(timeout_s) as scope:
            try:
                await self.host.connect(info)
            except Exception as exc:
                raise ConnectionError(failure_reason(exc)) from None
        if scope.cancelled_caught:
            raise ConnectionError(f"no answer within {timeout_s:.0f}s")
        return str(info.peer_id)

    # -- internals -------------------------------------------------------
    async def _consume(self, receive: trio.MemoryReceiveChannel[_ConnEvent]) -> None:
        async with receive:
            async for event in receive:
                if event.up:
                    self._on_up(event.conn)
                else:
                    self._on_down(event.conn)

    def _on_up(self, conn: INetConn) -> None:
        peer_id = str(conn.muxed_conn.peer_id)
        address, direction = _describe(conn)
        record = PeerConnection(peer_id, address, connection_kind(address), direction)
        if not self.table.connected(record):
            existing = self.table.get(peer_id)
            if existing is not None and existing.kind == "relayed" and record.kind == "direct":
                # A direct connection to a peer we reached through a relay: DCUtR's hole punch
                # (or a direct dial) replaced the relayed path; the table shows the better one.
                existing.address, existing.kind, existing.direction = address, "hole-punched", direction
                log.info("event=connection_upgraded peer=%s addr=%s kind=hole-punched", peer_id, address)
                for listener in list(self.upgrade_listeners):
                    listener(peer_id)
            return
        self.connects += 1
        log.info("event=connect peer=%s addr=%s direction=%s", peer_id, address, direction)
        assert self._nursery is not None
        scope = trio.CancelScope()
        self._peer_scopes[peer_id] = scope
        self._peer_gone[peer_id] = trio.Event()
        self._nursery.start_soon(self._watch_peer, conn.muxed_conn.peer_id, scope)
        for listener in list(self.connect_listeners):
            listener(peer_id)

    def _on_down(self, conn: INetConn) -> None:
        peer = conn.muxed_conn.peer_id
        remaining = self.host.get_network().get_connections(peer)
        if remaining:
            # Another connection to the same peer is still up: show the one left.
            record = self.table.get(str(peer))
            address, direction = _describe(remaining[0])
            if record is not None and record.address != address:
                kind = connection_kind(address)
                record.address, record.direction = address, direction
                record.kind = "hole-punched" if record.kind == "hole-punched" and kind == "direct" else kind
            return
        self._forget(str(peer))

    def _forget(self, peer_id: str, reason: str = "closed") -> None:
        record = self.table.disconnected(peer_id)
        if record is None:
            return
        self.disconnects += 1
        log.info(
            "event=disconnect peer=%s addr=%s after_s=%.1f reason=%s",
            peer_id,
            record.address,
            time.time() - record.connected_at,
            reason,
        )
        scope = self._peer_scopes.pop(peer_id, None)
        if scope is not None:
            scope.cancel()
        gone = self._peer_gone.pop(peer_id, None)
        if gone is not None:
            gone.set()

    async def _watch_peer(self, peer: PeerID, scope: trio.CancelScope) -> None:
        with scope:
            if self._linked(peer):
                await self._read_agent(peer)
            await self._ping_loop(peer)

    def _linked(self, peer: PeerID) -> bool:
        """Whether the swarm holds a connection to the peer. The watcher opens streams only then: on a peer
        with none, `new_stream` dials it back, which would undo every disconnect that the swarm's notice
        (sent a moment after the connection is gone) has not reached the mesh yet."""
        return bool(self.host.get_network().get_connections(peer))

    async def _read_agent(self, peer: PeerID) -> None:
        record = self.table.get(str(peer))
        with trio.move_on_after(IDENTIFY_TIMEOUT_S):
            try:
                stream = await self.host.new_stream(peer, [IDENTIFY_PROTOCOL])
                try:
                    data = await read_length_prefixed_protobuf(stream, use_varint_format=True)
                finally:
                    await stream.close()
                message = Identify()
                message.ParseFromString(data)
                if record is not None:
                    record.agent = message.agent_version or None
            except Exception as exc:
                log.debug('event=identify_failed peer=%s reason="%s"', peer, failure_reason(exc))

    async def _ping_loop(self, peer: PeerID) -> None:
        """Measure RTT on one reused ping stream (a new stream costs 6-25 ms)."""
        stream: INetStream | None = None
        unlinked_since: float | None = None
        try:
            while True:
                if not self._linked(peer):
                    # py-libp2p forgets a connection whose close fails midway without a notice: past a few
                    # pings' time with none, the peer is gone whatever the notices say.
                    now = time.monotonic()
                    unlinked_since = unlinked_since if unlinked_since is not None else now
                    if now - unlinked_since >= UNLINKED_GRACE_PINGS * self.ping_interval_s:
                        self._forget(str(peer), reason="no_connection")
                        return
                    await trio.sleep(ping_interval(self.ping_interval_s, len(self.table)))
                    continue
                unlinked_since = None
                rtt_ms = None
                with trio.move_on_after(DIAL_TIMEOUT_S):
                    try:
                        if stream is None:
                            stream = await self.host.new_stream(peer, [PING_PROTOCOL])
                        payload = os.urandom(PING_SIZE)
                        started = time.perf_counter()
                        await stream.write(payload)
                        echo = await _read_exactly(stream, PING_SIZE)
                        if echo == payload:
                            rtt_ms = (time.perf_counter() - started) * 1000
                    except Exception as exc:
                        log.debug('event=ping_failed peer=%s reason="%s"', peer, failure_reason(exc))
                if rtt_ms is None and stream is not None:
                    await _reset_quietly(stream)
                    stream = None
                record = self.table.get(str(peer))
                if record is not None and rtt_ms is not None:
                    record.rtt_ms = round(rtt_ms, 3)
                await trio.sleep(ping_interval(self.ping_interval_s, len(self.table)))
        finally:
            if stream is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    await _reset_quietly(stream)

    async def _keep_bootstrap_link(self, addr: multiaddr.Multiaddr) -> None:
        backoff = Backoff()
        while True:
            try:
                peer_id = await self.connect(addr)
            except ConnectionError as exc:
                delay = backoff.next_delay()
                # Warn on the first failure and now and then, not on every retry.
                level = logging.WARNING if backoff.attempts % 10 == 1 else logging.DEBUG
                log.log(
                    level,
                    'event=bootstrap_unreachable addr=%s reason="%s" attempts=%d retry_in_s=%.1f',
                    addr,
                    exc,
                    backoff.attempts,
                    delay,
                )
                await trio.sleep(delay)
                continue
            backoff.reset()
            # The notifee may not have delivered the connect event yet.
            while peer_id not in self.table:
                await trio.sleep(0.05)
                if not self.host.get_network().get_connections(PeerID.from_base58(peer_id)):
                    break
            gone = self._peer_gone.get(peer_id)
            if gone is not None:
                await gone.wait()
                log.info("event=bootstrap_lost addr=%s", addr)
            await trio.sleep(backoff.next_delay())


async def _read_exactly(stream: INetStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.read(n - len(buf))
        if not chunk:
            raise EOFError("stream closed")
        buf += chunk
    return bytes(buf)


async def _reset_quietly(stream: INetStream) -> None:
    try:
        await stream.reset()
    except Exception:  # the stream may already be gone with its connection
        pass
