"""Iterative Kademlia lookup, independent of the wire.

The caller supplies `query(peer) -> Reply`; this module decides whom to ask,
keeps up to `alpha` queries in flight, learns closer peers from the replies and
stops when `done()` says so or when the `k` closest live peers it knows of have
all answered. It records how many peers it asked and the hop depth at which
each peer was learnt (seeds are hop 1; a peer learnt from a hop-n reply is hop
n+1), so the hop count it reports is the real length of the referral chain.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import trio
from libp2p.peer.id import ID as PeerID


def key_hash(key: bytes) -> int:
    """Position of a key in the DHT keyspace (py-libp2p hashes keys with sha256)."""
    return int.from_bytes(hashlib.sha256(key).digest(), "big")


def peer_hash(peer: PeerID) -> int:
    return key_hash(peer.to_bytes())


def sort_by_distance(target: bytes, peers: Iterable[PeerID]) -> list[PeerID]:
    t = key_hash(target)
    return sorted(set(peers), key=lambda p: peer_hash(p) ^ t)


@dataclass
class Reply:
    """What one peer answered: closer peers and, if the query found it, a result."""

    closer: list[PeerID] = field(default_factory=list)
    hit: bool = False


@dataclass
class LookupTrace:
    queried: int = 0
    failed: int = 0
    hit_hops: int | None = None  # hop depth of the first peer whose reply was a hit
    max_hops: int = 0
    dead: set[PeerID] = field(default_factory=set)
    answered: list[PeerID] = field(default_factory=list)


async def iterative_lookup(
    target: bytes,
    seeds: Iterable[PeerID],
    query: Callable[[PeerID], Awaitable[Reply]],
    *,
    alpha: int = 3,
    k: int = 20,
    done: Callable[[], bool] = lambda: False,
    exclude: Iterable[PeerID] = (),
) -> LookupTrace:
    """Run the lookup; `query` raising any Exception marks that peer dead."""
    excluded = set(exclude)
    t = key_hash(target)
    depth: dict[PeerID, int] = {}
    for p in seeds:
        if p not in excluded:
            depth.setdefault(p, 1)
    queried: set[PeerID] = set()
    trace = LookupTrace()
    send, recv = trio.open_memory_channel[tuple[PeerID, Reply | None]](math.inf)

    def next_candidate() -> PeerID | None:
        live = sorted((p for p in depth if p not in trace.dead), key=lambda p: peer_hash(p) ^ t)
        for p in live[:k]:
            if p not in queried:
                return p
        return None

    async def ask(peer: PeerID) -> None:
        try:
            reply: Reply | None = await query(peer)
        except Exception:
            reply = None
        await send.send((peer, reply))

    def absorb(peer: PeerID, reply: Reply | None) -> None:
        hop = depth[peer]
        if reply is None:
            trace.failed += 1
            trace.dead.add(peer)
            return
        trace.answered.append(peer)
        trace.max_hops = max(trace.max_hops, hop)
        if reply.hit and trace.hit_hops is None:
            trace.hit_hops = hop
        for c in reply.closer:
            if c not in excluded and c not in depth:
                depth[c] = hop + 1

    in_flight = 0
    async with trio.open_nursery() as nursery:
        while not done():
            while in_flight < alpha:
                cand = next_candidate()
                if cand is None:
                    break
                queried.add(cand)
                trace.queried += 1
                in_flight += 1
                nursery.start_soon(ask, cand)
            if in_flight == 0:
                break
            absorb(*await recv.receive())
            in_flight -= 1
        nursery.cancel_scope.cancel()
    # replies that arrived while `done()` turned true still count
    while True:
        try:
            absorb(*recv.receive_nowait())
        except trio.WouldBlock:
            break
    return trace
