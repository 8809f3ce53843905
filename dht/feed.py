"""A network notifee that reports every new connection (to feed the routing table)."""

from __future__ import annotations

from collections.abc import Callable

import multiaddr
from libp2p.abc import INetConn, INetStream, INetwork, INotifee
from libp2p.peer.id import ID as PeerID


class ConnectionFeed(INotifee):
    """Feeds the routing table from every new connection (py-libp2p does not)."""

    def __init__(self, on_connected: Callable[[PeerID], None]) -> None:
        self._on_connected = on_connected

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        self._on_connected(conn.muxed_conn.peer_id)

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        pass

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def listen(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        pass

    async def listen_close(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        pass
