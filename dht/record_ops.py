"""Signed records on top of the DHT core: publish, republish, fetch the newest."""

from __future__ import annotations

import logging
import time

import trio
from libp2p.kad_dht.common import format_time_rfc3339
from libp2p.kad_dht.pb.kademlia_pb2 import Record
from libp2p.peer.id import ID as PeerID

from knexa.dht.core import DhtCore, OwnRecord
from knexa.dht.envelope import RecordError, SignedRecord, select_best, sign_record, verify_record
from knexa.dht.keys import record_key
from knexa.dht.lookup import Reply

logger = logging.getLogger(__name__)


class RecordOps(DhtCore):
    """``put_record`` / ``get_record`` with signed, expiring, sequenced envelopes."""

    async def _maintain(self) -> None:
        now = time.time()
        for key, own in list(self._own.items()):
            if own.record.expires_at - now <= own.ttl * self.config.republish_fraction:
                try:
                    await self._publish(key, own.name, own.value, own.ttl)
                except Exception as exc:  # retried on the next tick
                    logger.warning("republishing %s failed: %s", key, exc)
        await super()._maintain()

    # ---- signed records --------------------------------------------------

    def _next_seq(self) -> int:
        # Time-based so that a restarted node's records still beat its old ones.
        self._seq = max(self._seq + 1, time.time_ns() // 1_000_000)
        return self._seq

    async def put_record(self, name: str, value: bytes, ttl: float | None = None) -> int:
        """Publish this node's record `name` (republished before it expires).

        Returns how many peers stored it.
        """
        ttl = self.config.record_ttl if ttl is None else ttl
        key = record_key(self.host.get_id(), name)
        return await self._publish(key, name, value, ttl)

    async def _publish(self, key: str, name: str, value: bytes, ttl: float) -> int:
        rec = sign_record(self.key_pair, key, value, seq=self._next_seq(), ttl=ttl)
        raw = rec.encode()
        self._own[key] = OwnRecord(name, value, ttl, rec)
        self._store_local(key, raw)
        stored = await self.put_raw(key, raw)
        self._counters["records_put"] += 1
        return stored

    def _store_local(self, key: str, raw: bytes) -> None:
        kb = key.encode()
        existing = self.dht.value_store.get(kb)
        if existing is not None and existing.value != raw:
            try:
                if select_best(key, [existing.value, raw]) == 0:
                    return
            except RecordError:
                pass
        self.dht.value_store.put_record(kb, Record(key=kb, value=raw, timeReceived=format_time_rfc3339()))

    async def put_raw(self, key: str, raw: bytes) -> int:
        """Store envelope bytes at the k closest peers; RecordError if invalid."""
        verify_record(key, raw)
        kb = key.encode()
        peers = await self._closest(kb, record=True)
        stored = 0

        async def send(peer: PeerID) -> None:
            nonlocal stored
            if await self.client.put_value(peer, kb, raw):
                stored += 1

        async with trio.open_nursery() as nursery:
            for peer in peers:
                nursery.start_soon(send, peer)
        return stored

    async def get_record(
        self,
        owner: PeerID | str,
        name: str,
        timeout: float | None = None,  # noqa: ASYNC109
        quorum: int = 3,
    ) -> SignedRecord | None:
        """The newest valid record `name` of `owner`, or None if none is found.

        Invalid copies (forged, expired, malformed) are discarded; the lookup
        stops after `quorum` valid copies or when the closest peers are exhausted.
        """
        key = record_key(owner, name)
        kb = key.encode()
        candidates: list[bytes] = []
        local = self.dht.value_store.get(kb)
        if local is not None:
            candidates.append(local.value)
        valid = 0

        async def query(peer: PeerID) -> Reply:
            nonlocal valid
            value, closer = await self.client.get_value(peer, kb)
            await self._answered(peer)
            ok = False
            if value is not None:
                try:
                    verify_record(key, value)
                    candidates.append(value)
                    valid += 1
                    ok = True
                except RecordError as exc:
                    self._counters["records_rejected"] += 1
                    logger.info("discarded a record for %s from %s: %s", key, peer, exc)
            return Reply(closer=closer, hit=ok)

        with trio.move_on_after(timeout or self.config.lookup_timeout):
            await self._lookup(kb, query, done=lambda: valid >= quorum)
        try:
            best = candidates[select_best(key, candidates)]
        except RecordError:
            self._finish(False)
            return None
        self._store_local(key, best)
        self._finish(True)
        return verify_record(key, best)
