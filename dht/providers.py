"""Provider results: deduplication and the plain-dict form the daemon's API returns.

Pure code, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypedDict

from libp2p.peer.id import ID as PeerID
from libp2p.peer.peerinfo import PeerInfo


class PeerDict(TypedDict):
    peer_id: str
    addrs: list[str]


def _addr_text(addr: object) -> str:
    """The multiaddr without a trailing /p2p/<id> part (the peer id is separate)."""
    text = str(addr)
    cut = text.find("/p2p/")
    return text[:cut] if cut > 0 else text


def dedupe_providers(infos: Iterable[PeerInfo], limit: int | None = None) -> list[PeerInfo]:
    """One entry per peer id, first-seen order, addresses merged without repeats."""
    order: list[PeerID] = []
    merged: dict[PeerID, PeerInfo] = {}
    seen_addrs: dict[PeerID, set[str]] = {}
    for info in infos:
        pid = info.peer_id
        if pid not in merged:
            if limit is not None and len(order) >= limit:
                continue
            order.append(pid)
            merged[pid] = PeerInfo(pid, [])
            seen_addrs[pid] = set()
        for addr in info.addrs:
            text = _addr_text(addr)
            if text not in seen_addrs[pid]:
                seen_addrs[pid].add(text)
                merged[pid].addrs.append(addr)
    return [merged[p] for p in order]


def to_peer_dict(info: PeerInfo) -> PeerDict:
    addrs: list[str] = []
    for addr in info.addrs:
        text = _addr_text(addr)
        if text not in addrs:
            addrs.append(text)
    return {"peer_id": info.peer_id.to_base58(), "addrs": addrs}
