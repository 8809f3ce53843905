"""The Discovery service: providers, peer routing and signed records over Kademlia.

Start it with ``await nursery.start(discovery.run)`` or
``async with discovery.running():``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import trio
from libp2p.peer.id import ID as PeerID
from libp2p.peer.peerinfo import PeerInfo

from knexa.dht.config import DiscoveryError
from knexa.dht.keys import (
    adapter_key,
    model_key,
    parse_peer_id,
    prefix_key,
)
from knexa.dht.lookup import Reply
from knexa.dht.providers import PeerDict, dedupe_providers, to_peer_dict
from knexa.dht.record_ops import RecordOps

logger = logging.getLogger(__name__)


class Discovery(RecordOps):
    """Kademlia discovery for one host. Start with ``await nursery.start(d.run)``."""

    async def _maintain(self) -> None:
        await super()._maintain()
        mono = trio.current_time()
        for key, last in list(self._provided.items()):
            if mono - last >= self.config.reannounce_interval:
                try:
                    await self._announce(key)
                except Exception as exc:  # retried on the next tick
                    logger.warning("re-announcing %s failed: %s", key.hex(), exc)

    # ---- providers -------------------------------------------------------

    async def provide(self, key: bytes) -> int:
        """Announce that this node provides `key` (re-announced periodically).

        Returns how many peers accepted the provider record (0 when alone).
        """
        if not isinstance(key, bytes) or not 0 < len(key) <= 80:
            raise DiscoveryError("a content key is 1-80 bytes (see knexa.dht.keys)")
        self._provided[key] = trio.current_time()
        return await self._announce(key)

    def stop_providing(self, key: bytes) -> None:
        """Stop re-announcing `key` (existing records expire on their own)."""
        self._provided.pop(key, None)
        self.dht.provider_store.providing_keys.discard(key)

    async def _announce(self, key: bytes) -> int:
        me = PeerInfo(self.host.get_id(), list(self.host.get_addrs()))
        self.dht.provider_store.add_provider(key, me)
        self._provided[key] = trio.current_time()
        peers = await self._closest(key)
        accepted = 0

        async def send(peer: PeerID) -> None:
            nonlocal accepted
            if await self.client.add_provider(peer, key):
                accepted += 1

        async with trio.open_nursery() as nursery:
            for peer in peers:
                nursery.start_soon(send, peer)
        self._counters["announcements"] += 1
        if accepted < len(peers) and key in self._provided:
            # py-libp2p servers refuse more than 10 ADD_PROVIDER per 10 s from
            # one peer: try again soon rather than after a full interval.
            cfg = self.config
            self._provided[key] = trio.current_time() - cfg.reannounce_interval + cfg.announce_retry
        return accepted

    async def announce_model(self, name: str, weights_hash: str) -> int:
        """Provide a served model under its weights hash and under its name."""
        by_hash = await self.provide(model_key(weights_hash))
        by_name = await self.provide(model_key(name))
        return min(by_hash, by_name)

    async def announce_adapter(self, adapter_id: str) -> int:
        return await self.provide(adapter_key(adapter_id))

    async def announce_prefix(self, model_hash: str, token_ids: Sequence[int]) -> int:
        """Provide a KV-cache prefix held for `model_hash`."""
        return await self.provide(prefix_key(model_hash, token_ids))

    async def find_model(
        self,
        name_or_hash: str,
        limit: int = 20,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> list[PeerDict]:
        """Providers of a model, by name or weights hash (``find model NAME``)."""
        return await self.find_providers(model_key(name_or_hash), limit, timeout)

    async def find_providers(
        self,
        key: bytes,
        limit: int = 20,
        timeout: float | None = None,  # noqa: ASYNC109 - the daemon API's name
        *,
        use_local: bool = True,
    ) -> list[PeerDict]:
        """Distinct providers of `key` (this node included if it provides it).

        Provider records that other peers stored at this node count unless
        `use_local` is False, which forces a network lookup (fresher; used by
        the benchmark).
        """
        if limit <= 0:
            return []
        found: list[PeerInfo] = self._local_providers(key, use_store=use_local)

        async def query(peer: PeerID) -> Reply:
            providers, closer = await self.client.get_providers(peer, key)
            await self._answered(peer)
            found.extend(p for p in providers if p.addrs or p.peer_id == self.host.get_id())
            return Reply(closer=closer, hit=bool(providers))

        def done() -> bool:
            return len(dedupe_providers(found, limit)) >= limit

        with trio.move_on_after(timeout or self.config.lookup_timeout):
            if not done():
                await self._lookup(key, query, done=done)
        result = dedupe_providers(found, limit)
        self._finish(bool(result))
        return [to_peer_dict(p) for p in result]

    def _local_providers(self, key: bytes, *, use_store: bool) -> list[PeerInfo]:
        """This node if it provides `key`, plus provider records others stored here."""
        out: list[PeerInfo] = []
        if key in self._provided:
            out.append(PeerInfo(self.host.get_id(), list(self.host.get_addrs())))
        if use_store:
            out.extend(self.dht.provider_store.get_providers(key))
        return out

    # ---- peers -----------------------------------------------------------

    async def find_peer(
        self,
        peer_id: PeerID | str,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> PeerDict | None:
        """Addresses of `peer_id`: from the peerstore if known, else via the DHT."""
        target = parse_peer_id(peer_id)
        if target == self.host.get_id():
            return to_peer_dict(PeerInfo(target, list(self.host.get_addrs())))
        info = await self._find_peer_info(target, timeout)
        self._finish(info is not None)
        return to_peer_dict(info) if info else None

    async def _find_peer_info(
        self,
        target: PeerID,
        timeout: float | None,  # noqa: ASYNC109
    ) -> PeerInfo | None:
        store = self.host.get_peerstore()
        if target in self.host.get_connected_peers():
            try:
                return PeerInfo(target, list(store.addrs(target)))
            except Exception:
                pass
        hit: list[PeerInfo] = []

        async def query(peer: PeerID) -> Reply:
            infos = await self.client.find_node(peer, target.to_bytes())
            await self._answered(peer)
            match = [i for i in infos if i.peer_id == target and i.addrs]
            hit.extend(match)
            return Reply(closer=[i.peer_id for i in infos], hit=bool(match))

        with trio.move_on_after(timeout or self.config.lookup_timeout):
            await self._lookup(target.to_bytes(), query, done=lambda: bool(hit))
        if hit:
            return dedupe_providers(hit)[0]
        try:
            addrs = list(store.addrs(target))
        except Exception:
            addrs = []
        return PeerInfo(target, addrs) if addrs else None

    async def connect_peer(
        self,
        peer_id: PeerID | str,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> PeerDict:
        """Connect to `peer_id`, resolving its addresses through the DHT if needed."""
        target = parse_peer_id(peer_id)
        if target in self.host.get_connected_peers():
            return to_peer_dict(PeerInfo(target, list(self.host.get_peerstore().addrs(target))))
        info = await self._find_peer_info(target, timeout)
        if info is None:
            self._finish(False)
            raise DiscoveryError(f"peer {target} not found in the DHT")
        await self._connect(info)
        self._finish(True)
        return to_peer_dict(info)
