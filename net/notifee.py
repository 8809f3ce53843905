"""Connection up/down callbacks from the swarm; its other notifications are ignored."""

from __future__ import annotations

from collections.abc import Callable

import multiaddr
from libp2p.abc import INetConn, INetStream, INetwork, INotifee


def _ignore(conn: INetConn) -> None:
    return None


class ConnectionNotifee(INotifee):
    """Calls `on_connected` / `on_disconnected` (synchronously: they must not block)."""

    def __init__(
        self,
        on_connected: Callable[[INetConn], None],
        on_disconnected: Callable[[INetConn], None] = _ignore,
    ) -> None:
        self._on_connected = on_connected
        self._on_disconnected = on_disconnected

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        self._on_connected(conn)

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        self._on_disconnected(conn)

    # py-libp2p's INotifee requires these; stream and listener events are not used.
    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def listen(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        return None

    async def listen_close(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        return None
