"""GossipSub on the node's host, for small signed announcements (ledger deltas)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

from libp2p.abc import IHost
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, PROTOCOL_ID_V12, GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service

# GossipSub drops messages over 1 MiB and more than 10 per second per peer and
# topic (see BRIEF section 2); publishers batch below these.
MAX_PUBLISH_BYTES = 1 << 20
MAX_PUBLISH_PER_S = 10
FORWARDED_PER_PEER_PER_S = 500.0
# go-libp2p's IDontWantMessageThreshold: below it an IDONTWANT costs about what the
# duplicate it saves would.
IDONTWANT_MIN_BYTES = 1024


class _GossipSub(GossipSub):
    """py-libp2p's GossipSub, sending IDONTWANT only for messages of IDONTWANT_MIN_BYTES or more.

    py-libp2p sends one for every message it forwards, to every mesh peer, each in its own RPC
    carrying a signed peer record, and awaits those sends before it forwards the message. For
    the ledger's small deltas that was most of an idle node's pubsub work and a delay per hop.
    """

    async def _emit_idontwant_for_message(self, msg_id: bytes, topic_ids: Iterable[str]) -> None:
        # publish() puts the message in the cache (keyed like pubsub's default id) just before this.
        message = self.mcache.get(msg_id)
        if message is not None and message.ByteSize() < IDONTWANT_MIN_BYTES:
            return
        await super()._emit_idontwant_for_message(msg_id, topic_ids)


def build_gossipsub() -> GossipSub:
    return _GossipSub(
        protocols=[PROTOCOL_ID_V12, PROTOCOL_ID_V11],
        # Each node sends every message to each mesh peer and receives it from
        # each: with go-libp2p's 6/4/12, meshes filled towards 12 and an idle
        # node sent 8.5 copies per ledger delta. A smaller mesh still keeps a
        # 50-node mesh within 3-4 hops, and anti-entropy repairs what it misses.
        degree=4,
        degree_low=3,
        degree_high=6,
        heartbeat_interval=1,
        # Eclipse protection wants peers from several IPs in every mesh, which
        # a LAN or a loopback testnet cannot offer; peers are authenticated
        # and every ledger entry is signed, so a flooding peer gains nothing.
        eclipse_protection_enabled=False,
        # The default (10/s) counts *forwarded* messages per forwarding peer and
        # penalises the forwarder's score, so in a mesh of a few dozen nodes
        # honest relays get dropped and pruned and deltas fall back to the 30 s
        # anti-entropy. Publishers here batch to 5/s each and every entry is
        # signature-checked; this bound still stops a flooding peer.
        max_messages_per_topic_per_second=FORWARDED_PER_PEER_PER_S,
    )


@asynccontextmanager
async def open_pubsub(host: IHost) -> AsyncIterator[Pubsub]:
    """Run GossipSub on `host` (already running) for the block's duration."""
    router = build_gossipsub()
    pubsub = Pubsub(host, router, strict_signing=True)
    try:
        async with background_trio_service(pubsub):
            async with background_trio_service(router):
                await pubsub.wait_until_ready()
                yield pubsub
    finally:
        # py-libp2p's seen-message cache sweeps in a thread of its own that nothing else stops (one more
        # would stay behind for every pubsub, e.g. each daemon restarted in place); stopping it is immediate.
        pubsub.seen_messages.stop()
