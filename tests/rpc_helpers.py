"""Shared helpers for the RPC tests: real hosts on loopback, connected pairwise."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.peer.peerinfo import info_from_p2p_addr

from knexa.net.host import build_host
from knexa.net.rpc import RpcService

LOOPBACK = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]


@dataclass
class Node:
    host: IHost
    key_pair: KeyPair
    rpc: RpcService

    @property
    def peer_id(self) -> Any:
        return self.host.get_id()


async def connect(a: IHost, b: IHost) -> None:
    """Dial `b` from `a`."""
    await a.connect(info_from_p2p_addr(b.get_addrs()[0]))


@asynccontextmanager
async def rpc_nodes(n: int = 2, **rpc_kwargs: Any) -> AsyncIterator[list[Node]]:
    """`n` started hosts, each running an RpcService, node 0 connected to all others."""
    async with AsyncExitStack() as stack:
        nodes: list[Node] = []
        for _ in range(n):
            kp = create_new_key_pair()
            host = build_host(kp, LOOPBACK)
            await stack.enter_async_context(host.run(LOOPBACK))
            svc = RpcService(host, kp, **rpc_kwargs)
            nodes.append(Node(host, kp, svc))
        for node in nodes[1:]:
            await connect(nodes[0].host, node.host)
        for node in nodes:
            await stack.enter_async_context(node.rpc.running())
        with trio.fail_after(60):
            yield nodes
