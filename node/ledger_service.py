"""Replicating the capability ledger: gossip for deltas, RPC anti-entropy to catch up.

The ledger itself (`knexa.crdt.Ledger`) is pure; this unit moves its bytes:
- deltas (our writes) are batched and published on a GossipSub topic, at most
  a few messages per second and each well under GossipSub's 1 MiB limit;
- received batches are merged by the topic validator, so a batch with any
  rejected entry is not forwarded by this node;
- on every new connection and periodically, an anti-entropy exchange over the
  signed RPC layer (summary, then digests of differing buckets, then exactly
  the missing entries both ways) lets a node that was away catch up exactly.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any

import trio
from libp2p.peer.id import ID as PeerID
from libp2p.pubsub.pubsub import Pubsub
from pydantic import BaseModel, Field

from knexa.crdt import codec
from knexa.crdt.digest import differing_buckets
from knexa.crdt.entry import Entry
from knexa.crdt.ledger import DEFAULT_PROFILE_TTL_S, Ledger, MergeResult
from knexa.crdt.profile import CapabilityProfile
from knexa.net.failures import failure_reason
from knexa.net.mesh import Mesh
from knexa.net.rpc import ErrorCode, RpcError, RpcService

log = logging.getLogger("knexa.ledger")

TOPIC = "/knexa/ledger/1"
METHOD_SUMMARY = "ledger.summary"
METHOD_EXCHANGE = "ledger.exchange"
METHOD_PUSH = "ledger.push"
BATCH_BYTES = 256 * 1024
GOODBYE_TIMEOUT_S = 2.0
PUBLISH_INTERVAL_S = 0.2  # at most 5 messages/s, under GossipSub's 10/s
SYNC_TIMEOUT_S = 10.0
MAX_BATCHES = 24  # 24 x 256 KiB fits one 8 MiB RPC frame; the next sync does the rest


class SummaryMessage(BaseModel):
    summary: bytes


class ExchangeRequest(BaseModel):
    digest: bytes


class ExchangeResponse(BaseModel):
    entries: list[bytes] = Field(max_length=MAX_BATCHES)
    digest: bytes


class PushRequest(BaseModel):
    entries: list[bytes] = Field(max_length=MAX_BATCHES)


class PushResponse(BaseModel):
    accepted: int
    rejected: dict[str, int]


class LedgerService:
    def __init__(
        self,
        ledger: Ledger,
        rpc: RpcService,
        pubsub: Pubsub,
        mesh: Mesh,
        profile_source: Callable[[], CapabilityProfile],
        *,
        profile_ttl_s: float = DEFAULT_PROFILE_TTL_S,
        sync_interval_s: float = 30.0,
        sync_timeout_s: float = SYNC_TIMEOUT_S,
    ) -> None:
        self.ledger = ledger
        self.rpc = rpc
        self.pubsub = pubsub
        self.mesh = mesh
        self.profile_source = profile_source
        self.profile_ttl_s = profile_ttl_s
        self.sync_interval_s = sync_interval_s
        self.sync_timeout_s = sync_timeout_s
        self.syncs_ok = 0
        self.syncs_failed = 0
        self.published_batches = 0
        self._pending: list[Entry] = []
        self._retracted = False
        self._pending_event = trio.Event()
        self._profile_changed = trio.Event()
        self._sync_send, self._sync_receive = trio.open_memory_channel[str](256)
        rpc.register(METHOD_SUMMARY, self._handle_summary, SummaryMessage, SummaryMessage)
        rpc.register(METHOD_EXCHANGE, self._handle_exchange, ExchangeRequest, ExchangeResponse)
        rpc.register(METHOD_PUSH, self._handle_push, PushRequest, PushResponse)

    # -- lifecycle -------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.pubsub.set_topic_validator(TOPIC, self._validate_gossip, False)
        subscription = await self.pubsub.subscribe(TOPIC)
        self.mesh.connect_listeners.append(self._on_connect)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._drain, subscription)
                nursery.start_soon(self._publish_loop)
                nursery.start_soon(self._sync_worker)
                nursery.start_soon(self._periodic_sync)
                self.refresh_profile()
                nursery.start_soon(self._refresh_loop)
                task_status.started()
        finally:
            self.mesh.connect_listeners.remove(self._on_connect)

    async def say_goodbye(self, entries: list[Entry]) -> int:
        """On the way out, while the connections are still up: the node's last words (its retracted profile,
        and whatever else it withdraws, already written to the ledger) pushed by RPC to each connected peer,
        which gossips them on. Bounded; returns how many peers acknowledged."""
        batches = codec.encode_entry_batches(entries, BATCH_BYTES)
        told: list[str] = []

        async def tell(peer: str) -> None:
            try:
                await self.rpc.call(PeerID.from_base58(peer), METHOD_PUSH, PushRequest(entries=batches),
                                    response_model=PushResponse)
                told.append(peer)
            except Exception as exc:  # a peer that is going too, or already gone
                log.debug("event=goodbye_failed peer=%s reason=%s", peer, exc)

        with trio.move_on_after(GOODBYE_TIMEOUT_S):
            async with trio.open_nursery() as nursery:
                for peer in self.mesh.peers():
                    nursery.start_soon(tell, peer.peer_id)
        log.info("event=goodbye entries=%d peers_told=%d", len(entries), len(told))
        return len(told)

    def retract_profile(self) -> Entry:
        """The node is leaving: its profile is withdrawn, and from now on never written again (a refresh
        between the goodbye and the stop would bring it back until the TTL). Returns the retraction."""
        self._retracted = True
        return self.ledger.retract_profile(ttl_s=self.profile_ttl_s)

    def refresh_profile(self) -> None:
        """Write our profile now (and announce it); call when something changed."""
        if self._retracted:
            return
        self.announce([self.ledger.put_profile(self.profile_source(), ttl_s=self.profile_ttl_s)])

    def announce(self, entries: list[Entry]) -> None:
        self._pending.extend(entries)
        self._pending_event.set()

    def request_sync(self, peer_id: str) -> None:
        try:
            self._sync_send.send_nowait(peer_id)
        except trio.WouldBlock:
            pass  # a sync burst is under way; the periodic sync covers this peer

    def stats(self) -> dict[str, Any]:
        counters = self.ledger.counters
        return {
            "entries": len(self.ledger.entries()),
            "accepted": counters.accepted,
            "superseded": counters.superseded,
            "rejected": dict(counters.rejected),
            "syncs_ok": self.syncs_ok,
            "syncs_failed": self.syncs_failed,
            "published_batches": self.published_batches,
        }

    # -- gossip ----------------------------------------------------------
    def _validate_gossip(self, forwarder: PeerID, message: Any) -> bool:
        result = self.ledger.merge_message(message.data)
        if result.rejected_by_reason:
            log.warning(
                "event=ledger_rejected source=gossip forwarder=%s reasons=%s",
                forwarder,
                _reasons(result),
            )
        return not result.rejected_by_reason

    async def _drain(self, subscription: Any) -> None:
        # The validator already merged each message; delivery needs no work.
        while True:
            await subscription.get()

    async def _publish_loop(self) -> None:
        while True:
            await self._pending_event.wait()
            self._pending_event = trio.Event()
            entries, self._pending = self._pending, []
            for batch in codec.encode_entry_batches(entries, BATCH_BYTES):
                try:
                    await self.pubsub.publish(TOPIC, batch)
                    self.published_batches += 1
                except Exception as exc:  # no peers yet, or a closing stream
                    log.debug("event=ledger_publish_failed reason=%s", exc)
                await trio.sleep(PUBLISH_INTERVAL_S)

    async def _refresh_loop(self) -> None:
        # Well inside the TTL, so a live node's profile never lapses anywhere.
        while True:
            await trio.sleep(self.profile_ttl_s / 3)
            self.refresh_profile()

    # -- anti-entropy ------------------------------------------------------
    def _on_connect(self, peer_id: str) -> None:
        self.request_sync(peer_id)

    async def _periodic_sync(self) -> None:
        while True:
            await trio.sleep(self.sync_interval_s * random.uniform(0.8, 1.2))
            peers = self.mesh.peers()
            if peers:
                self.request_sync(random.choice(peers).peer_id)

    async def _sync_worker(self) -> None:
        async for peer_id in self._sync_receive:
            started = time.perf_counter()
            try:
                received, sent = await self.sync_with(PeerID.from_base58(peer_id))
            except Exception as exc:  # one failed exchange must never stop replication
                self.syncs_failed += 1
                log.debug('event=ledger_sync_failed peer=%s reason="%s"', peer_id, failure_reason(exc))
                continue
            self.syncs_ok += 1
            if received or sent:
                log.info(
                    "event=ledger_synced peer=%s received=%d sent=%d ms=%.0f",
                    peer_id, received, sent, (time.perf_counter() - started) * 1000,
                )

    async def sync_with(self, peer: PeerID) -> tuple[int, int]:
        """One anti-entropy exchange; returns (entries received, entries sent)."""
        with trio.fail_after(self.sync_timeout_s):  # TooSlowError: counted as a failed sync
            local = self.ledger.bucket_summary()
            reply = await self.rpc.call(
                peer, METHOD_SUMMARY, SummaryMessage(summary=codec.encode_bucket_summary(local)),
                response_model=SummaryMessage,
            )
            buckets = differing_buckets(local, codec.decode_bucket_summary(reply.summary))
            if not buckets:
                return 0, 0
            exchanged = await self.rpc.call(
                peer, METHOD_EXCHANGE,
                ExchangeRequest(digest=codec.encode_digest(self.ledger.digest(buckets))),
                response_model=ExchangeResponse,
            )
            received = sum(len(self._merge(batch, f"sync:{peer}").accepted) for batch in exchanged.entries)
            missing = self.ledger.missing_for(codec.decode_digest(exchanged.digest))
            batches = codec.encode_entry_batches(missing, BATCH_BYTES)[:MAX_BATCHES]
            if batches:
                await self.rpc.call(peer, METHOD_PUSH, PushRequest(entries=batches), response_model=PushResponse)
            return received, len(missing)

    def _merge(self, batch: bytes, source: str) -> MergeResult:
        """Merge a batch that came by RPC; gossip what was new to us.

        Entries learned by anti-entropy would otherwise reach the rest of the
        mesh only at the next periodic sync. A node that already has them
        counts them as superseded and passes nothing on, so this terminates.
        """
        result = self.ledger.merge_message(batch)
        if result.rejected_by_reason:
            log.warning("event=ledger_rejected source=%s reasons=%s", source, _reasons(result))
        if result.accepted:
            self.announce(result.accepted)
        return result

    async def _handle_summary(self, request: SummaryMessage, ctx: Any) -> SummaryMessage:
        try:
            codec.decode_bucket_summary(request.summary)
        except codec.CodecError as exc:
            raise RpcError(ErrorCode.BAD_REQUEST, f"bad bucket summary: {exc}") from None
        return SummaryMessage(summary=codec.encode_bucket_summary(self.ledger.bucket_summary()))

    async def _handle_exchange(self, request: ExchangeRequest, ctx: Any) -> ExchangeResponse:
        try:
            remote = codec.decode_digest(request.digest)
        except codec.CodecError as exc:
            raise RpcError(ErrorCode.BAD_REQUEST, f"bad digest: {exc}") from None
        missing = self.ledger.missing_for(remote)
        return ExchangeResponse(
            entries=codec.encode_entry_batches(missing, BATCH_BYTES)[:MAX_BATCHES],
            digest=codec.encode_digest(self.ledger.digest(remote.buckets)),
        )

    async def _handle_push(self, request: PushRequest, ctx: Any) -> PushResponse:
        accepted, rejected = 0, {}
        for batch in request.entries:
            result = self._merge(batch, "push")
            accepted += len(result.accepted)
            for reason, count in result.rejected_by_reason.items():
                rejected[reason] = rejected.get(reason, 0) + count
        return PushResponse(accepted=accepted, rejected=rejected)


def _reasons(result: MergeResult) -> str:
    return ",".join(f"{k}:{v}" for k, v in sorted(result.rejected_by_reason.items()))
