"""The core of the Discovery service: lifecycle, routing table and lookups.

Thin trio layer. py-libp2p's `KadDHT` answers other peers (server mode) and
holds the local value and provider stores; this class runs knexa's own lookups
over them (see `knexa.dht.lookup`), feeds and refreshes the routing table, and
puts a deadline on every wait. `knexa.dht.record_ops` and `knexa.dht.service`
add the record and provider/peer APIs on top.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.crypto.keys import KeyPair
from libp2p.kad_dht.common import PROTOCOL_ID
from libp2p.kad_dht.kad_dht import DHTMode
from libp2p.peer.id import ID as PeerID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.records.validator import NamespacedValidator

from knexa.dht.config import DiscoveryConfig, DiscoveryError
from knexa.dht.envelope import SignedRecord
from knexa.dht.kad import KnexaKadDHT
from knexa.dht.keys import (
    RECORD_NAMESPACE,
)
from knexa.dht.logs import quiet_dht_stream_noise
from knexa.dht.lookup import LookupTrace, Reply, iterative_lookup, sort_by_distance
from knexa.dht.rpc import KadClient
from knexa.dht.validator import KnexaRecordValidator
from knexa.net.notifee import ConnectionNotifee

logger = logging.getLogger(__name__)


@dataclass
class OwnRecord:
    name: str
    value: bytes
    ttl: float
    record: SignedRecord


def _as_peer_info(item: PeerInfo | multiaddr.Multiaddr | str) -> PeerInfo:
    if isinstance(item, PeerInfo):
        return item
    try:
        addr = item if isinstance(item, multiaddr.Multiaddr) else multiaddr.Multiaddr(item)
        return info_from_p2p_addr(addr)
    except Exception as exc:
        raise DiscoveryError(f"bad bootstrap address {item!r}: {exc}") from None


class DhtCore:
    """Routing and lookups for one host; use the `Discovery` subclass."""

    def __init__(
        self,
        host: IHost,
        key_pair: KeyPair,
        *,
        server: bool = True,
        bootstrap: Sequence[PeerInfo | multiaddr.Multiaddr | str] = (),
        config: DiscoveryConfig | None = None,
    ) -> None:
        if PeerID.from_pubkey(key_pair.public_key) != host.get_id():
            raise DiscoveryError("key_pair is not the host's key")
        quiet_dht_stream_noise()
        self.host = host
        self.key_pair = key_pair
        self.server = server
        self.config = config or DiscoveryConfig()
        self.bootstrap_peers = [_as_peer_info(b) for b in bootstrap]
        validator = NamespacedValidator({RECORD_NAMESPACE: KnexaRecordValidator()}, strict_validation=True)
        self.dht = KnexaKadDHT(
            host,
            DHTMode.SERVER if server else DHTMode.CLIENT,
            validator=validator,
            validator_changed=True,
            strict_validation=True,
        )
        self.client = KadClient(host, self.config.rpc_timeout)
        # py-libp2p does not feed the routing table from connections; this does.
        self._feed = ConnectionNotifee(lambda conn: self._on_connected(conn.muxed_conn.peer_id))
        self._nursery: trio.Nursery | None = None
        self._own: dict[str, OwnRecord] = {}
        self._provided: dict[bytes, float] = {}  # key -> last announced (monotonic)
        self._seq = 0
        self._counters = {
            "lookups": 0,
            "lookups_failed": 0,
            "peers_queried": 0,
            "records_put": 0,
            "records_rejected": 0,
            "announcements": 0,
        }
        self.last_trace: LookupTrace | None = None
        self._failed: dict[PeerID, float] = {}  # peer -> skip until (trio clock)
        self._pending_adds: set[PeerID] = set()

    def set_server(self, server: bool) -> None:
        """Answer other peers' DHT queries (server) or not (client), e.g. as AutoNAT finds the node
        public or private. Not KadDHT.switch_mode: that empties the routing table, which a client
        still needs for its own lookups."""
        if server == self.server:
            return
        self.server = server
        self.dht.mode = DHTMode.SERVER if server else DHTMode.CLIENT
        if server:
            self.host.set_stream_handler(PROTOCOL_ID, self.dht.handle_stream)
        else:
            self.host.remove_stream_handler(PROTOCOL_ID)
        logger.info("event=dht_mode mode=%s", "server" if server else "client")

    # ---- lifecycle -------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled. Signals started after bootstrapping."""
        network = self.host.get_network()
        network.register_notifee(self._feed)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self.dht.on_inbound_peer = self._on_inbound_peer
                if self.server:
                    self.host.set_stream_handler(PROTOCOL_ID, self.dht.handle_stream)
                for peer in self.host.get_connected_peers():
                    self._on_connected(peer)
                await self.bootstrap()
                nursery.start_soon(self._refresh_loop)
                nursery.start_soon(self._maintenance_loop)
                task_status.started(self)
        finally:
            self._nursery = None
            self.dht.on_inbound_peer = None
            network.remove_notifee(self._feed)
            # The Kademlia handler stays installed: py-libp2p raises KeyError into
            # the host's own task group when a negotiation races with
            # remove_stream_handler, and answering a late request is harmless.

    @asynccontextmanager
    async def running(self) -> AsyncIterator[DhtCore]:
        """``async with discovery.running():`` starts the service and stops it on exit."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.run)
            try:
                yield self
            finally:
                nursery.cancel_scope.cancel()

    async def bootstrap(self) -> int:
        """Dial the bootstrap peers and look ourselves up; returns the routing-table size."""

        async def dial(info: PeerInfo) -> None:
            try:
                await self._connect(info)
            except DiscoveryError as exc:
                logger.info("bootstrap peer %s unreachable: %s", info.peer_id, exc)
                return
            await self._add_server(info.peer_id)

        async with trio.open_nursery() as nursery:
            for info in self.bootstrap_peers:
                if info.peer_id != self.host.get_id():
                    nursery.start_soon(dial, info)
        await self._self_lookup()
        return self.dht.get_routing_table_size()

    async def _self_lookup(self) -> None:
        me = self.host.get_id()

        async def query(peer: PeerID) -> Reply:
            infos = await self.client.find_node(peer, me.to_bytes())
            await self._answered(peer)
            for info in infos:
                with trio.move_on_after(self.config.rpc_timeout):
                    await self.dht.routing_table.add_peer(info)
            return Reply(closer=[i.peer_id for i in infos])

        with trio.move_on_after(self.config.lookup_timeout):
            await self._lookup(me.to_bytes(), query, count=False)

    async def _refresh_loop(self) -> None:
        while True:
            await trio.sleep(self.config.refresh_interval)
            try:
                await self.refresh()
            except Exception as exc:  # a bad round must not stop the service
                logger.warning("routing-table refresh failed: %s", exc)

    async def refresh(self) -> None:
        """One routing-table refresh: re-feed connections, self lookup, one random walk."""
        for peer in self.host.get_connected_peers():
            await self._maybe_add(peer, wait=0.0)
        if self.dht.get_routing_table_size() == 0 and self.bootstrap_peers:
            await self.bootstrap()
            return
        await self._self_lookup()
        target = random.randbytes(32)  # keeps far buckets fresh

        async def query(peer: PeerID) -> Reply:
            infos = await self.client.find_node(peer, target)
            await self._answered(peer)
            return Reply(closer=[i.peer_id for i in infos])

        with trio.move_on_after(self.config.lookup_timeout):
            await self._lookup(target, query, count=False)
        self.dht.provider_store.cleanup_expired()
        self.dht.value_store.cleanup_expired()

    async def _maintenance_loop(self) -> None:
        while True:
            await trio.sleep(self.config.maintenance_tick)
            try:
                await self._maintain()
            except Exception as exc:  # retried next tick
                logger.warning("record republish / re-announce failed: %s", exc)

    async def _maintain(self) -> None:
        """Periodic work of the subclasses (republish, re-announce)."""

    # ---- routing table ---------------------------------------------------

    def _on_connected(self, peer: PeerID) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(self._maybe_add, peer, self.config.identify_wait)

    async def _protocols(self, peer: PeerID, wait: float) -> list[str]:
        """The peer's protocols from identify, waiting up to `wait` s for them."""
        store = self.host.get_peerstore()
        deadline = trio.current_time() + wait
        while True:
            try:
                protocols = list(store.get_protocols(peer) or [])
            except Exception:
                protocols = []
            if protocols or trio.current_time() >= deadline:
                return protocols
            await trio.sleep(0.05)

    async def _maybe_add(self, peer: PeerID, wait: float) -> None:
        """Add a connected peer once identify says it serves the DHT."""
        if str(PROTOCOL_ID) in await self._protocols(peer, wait):
            await self._add_server(peer)

    def _on_inbound_peer(self, peer: PeerID) -> None:
        """A peer outside the routing table sent us a DHT request."""
        if self._nursery is not None and peer not in self._pending_adds:
            self._pending_adds.add(peer)
            self._nursery.start_soon(self._add_inbound, peer)

    async def _add_inbound(self, peer: PeerID) -> None:
        # Client-mode peers send requests too (py-libp2p's handler would add
        # them): only add peers whose identify lists the DHT protocol.
        try:
            protocols = await self._protocols(peer, self.config.identify_wait)
            if not protocols or str(PROTOCOL_ID) in protocols:
                await self._add_server(peer)
        finally:
            self._pending_adds.discard(peer)

    async def _answered(self, peer: PeerID) -> None:
        """A peer answered a DHT request: make sure it is in the routing table.

        Done in the background: adding to a full bucket pings the oldest peer,
        which must not delay the lookup.
        """
        if self.dht.routing_table.peer_in_table(peer):
            return
        if self._nursery is not None:
            self._nursery.start_soon(self._add_server, peer)
        else:
            await self._add_server(peer)

    async def _add_server(self, peer: PeerID) -> None:
        with trio.move_on_after(self.config.rpc_timeout):
            await self.dht.routing_table.add_peer(peer, skip_server_mode_check=True)

    def _seeds(self, target: bytes) -> list[PeerID]:
        seeds = self.dht.routing_table.find_local_closest_peers(target, 2 * self.config.k)
        if len(seeds) < self.config.alpha:
            seeds = seeds + list(self.host.get_connected_peers())
        return sort_by_distance(target, seeds)

    def _skipped(self) -> list[PeerID]:
        now = trio.current_time()
        for peer, until in list(self._failed.items()):
            if until <= now:
                del self._failed[peer]
        return [self.host.get_id(), *self._failed]

    async def _lookup(
        self,
        target: bytes,
        query: Callable[[PeerID], Awaitable[Reply]],
        *,
        done: Callable[[], bool] | None = None,
        count: bool = True,
    ) -> LookupTrace:
        trace = await iterative_lookup(
            target,
            self._seeds(target),
            query,
            alpha=self.config.alpha,
            k=self.config.k,
            done=done or (lambda: False),
            exclude=self._skipped(),
        )
        until = trio.current_time() + self.config.failure_ttl
        for peer in trace.dead:
            self._failed[peer] = until
            self.dht.routing_table.remove_peer(peer)
            # A peer that vanished without closing its connection (crash, sleep,
            # network cut) leaves a half-open connection: drop it so a later
            # dial fails fast instead of timing out on the stale stream.
            if self._nursery is not None:
                self._nursery.start_soon(self._drop_connection, peer)
        if count:
            self._counters["peers_queried"] += trace.queried
            self.last_trace = trace
        return trace

    async def _drop_connection(self, peer: PeerID) -> None:
        with trio.move_on_after(self.config.dial_timeout):
            try:
                await self.host.disconnect(peer)
            except Exception:
                pass

    async def _closest(self, target: bytes, *, record: bool = False) -> list[PeerID]:
        """The k closest live peers to `target`, by an iterative lookup.

        FIND_NODE for content keys; GET_VALUE for record keys, because the
        py-libp2p server refuses FIND_NODE keys that are not peer-id-like.
        """

        async def query(peer: PeerID) -> Reply:
            if record:
                _value, closer = await self.client.get_value(peer, target)
            else:
                closer = [i.peer_id for i in await self.client.find_node(peer, target)]
            await self._answered(peer)
            return Reply(closer=closer)

        with trio.move_on_after(self.config.lookup_timeout):
            trace = await self._lookup(target, query, count=False)
            return sort_by_distance(target, trace.answered)[: self.config.k]
        return []

    async def _connect(self, info: PeerInfo) -> None:
        if info.peer_id in self.host.get_connected_peers():
            return
        try:
            with trio.fail_after(self.config.dial_timeout):
                await self.host.connect(info)
        except trio.TooSlowError:
            raise DiscoveryError(f"dialing {info.peer_id} timed out") from None
        except Exception as exc:
            raise DiscoveryError(f"dialing {info.peer_id} failed: {exc}") from None

    def _finish(self, ok: bool) -> None:
        self._counters["lookups"] += 1
        if not ok:
            self._counters["lookups_failed"] += 1

    # ---- stats -----------------------------------------------------------

    def stats(self) -> dict[str, int | str]:
        c = self._counters
        return {
            "mode": "server" if self.server else "client",
            "routing_table_size": self.dht.get_routing_table_size(),
            "connected_peers": len(self.host.get_connected_peers()),
            "records_stored": self.dht.get_value_store_size(),
            "own_records": len(self._own),
            "provider_records": self.dht.provider_store.size(),
            "provided_keys": len(self._provided),
            "lookups_done": c["lookups"],
            "lookups_failed": c["lookups_failed"],
            "peers_queried": c["peers_queried"],
            "records_put": c["records_put"],
            "records_rejected": c["records_rejected"],
            "announcements": c["announcements"],
        }
