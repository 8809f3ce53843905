"""GossipSub on the node's host, for small signed announcements (ledger deltas)."""

from __future__ import annotations

from collections.abc import AsyncIterator
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


def build_gossipsub() -> GossipSub:
    return GossipSub(
        protocols=[PROTOCOL_ID_V12, PROTOCOL_ID_V11],
        degree=6,
        degree_low=4,
        degree_high=12,
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
    async with background_trio_service(pubsub):
        async with background_trio_service(router):
            await pubsub.wait_until_ready()
            yield pubsub
