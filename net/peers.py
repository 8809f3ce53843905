"""What the node knows about each connected peer: pure state, no I/O."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field


@dataclass
class PeerConnection:
    peer_id: str
    address: str
    kind: str  # "direct" or "relayed" (later also "hole-punched")
    direction: str  # "inbound" or "outbound"
    connected_at: float = field(default_factory=time.time)
    rtt_ms: float | None = None
    agent: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def connection_kind(address: str) -> str:
    return "relayed" if "/p2p-circuit" in address else "direct"


class PeerTable:
    """Connected peers keyed by peer id; one entry per peer however many connections."""

    def __init__(self) -> None:
        self._peers: dict[str, PeerConnection] = {}

    def connected(self, conn: PeerConnection) -> bool:
        """Record a connection; True if the peer is new."""
        is_new = conn.peer_id not in self._peers
        if is_new:
            self._peers[conn.peer_id] = conn
        return is_new

    def disconnected(self, peer_id: str) -> PeerConnection | None:
        return self._peers.pop(peer_id, None)

    def get(self, peer_id: str) -> PeerConnection | None:
        return self._peers.get(peer_id)

    def __contains__(self, peer_id: str) -> bool:
        return peer_id in self._peers

    def __len__(self) -> int:
        return len(self._peers)

    def snapshot(self) -> list[PeerConnection]:
        return sorted(self._peers.values(), key=lambda p: p.connected_at)
