"""Byte counters for every TCP connection of a host.

py-libp2p counts no bytes on its TCP transport, so the node installs a TCP
transport whose raw connections count what passes through them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from libp2p.abc import IRawConnection
from libp2p.transport.tcp.tcp import TCP, TCPListener
from multiaddr import Multiaddr


@dataclass
class TrafficCounter:
    bytes_in: int = 0
    bytes_out: int = 0

    def instrument(self, conn: Any) -> Any:
        """Wrap `conn`'s read and write in place so they count bytes."""
        read, write = conn.read, conn.write

        async def counted_read(n: int | None = None) -> bytes:
            data = await read(n)
            self.bytes_in += len(data)
            return data

        async def counted_write(data: bytes) -> None:
            await write(data)
            self.bytes_out += len(data)

        conn.read, conn.write = counted_read, counted_write
        return conn


class CountingTCP(TCP):
    """The stock TCP transport, with every raw connection counted."""

    def __init__(self, counter: TrafficCounter) -> None:
        super().__init__()
        self.counter = counter

    async def dial(self, maddr: Multiaddr) -> IRawConnection:
        return self.counter.instrument(await super().dial(maddr))

    async def dial_with_source(self, maddr: Multiaddr, source: Any) -> IRawConnection:
        return self.counter.instrument(await super().dial_with_source(maddr, source))

    def create_listener(self, handler_function: Any) -> TCPListener:
        async def counted_handler(stream: Any) -> None:
            await handler_function(self.counter.instrument(stream))

        return super().create_listener(counted_handler)
