"""Shared helpers for the DHT tests and benchmark: in-process hosts on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import multiaddr
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID as PeerID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr

from knexa.dht import Discovery, DiscoveryConfig
from knexa.net.host import build_host

LOOPBACK = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")


def fast_config(**overrides: float) -> DiscoveryConfig:
    base = {"rpc_timeout": 3.0, "lookup_timeout": 10.0, "dial_timeout": 3.0}
    base.update(overrides)
    return DiscoveryConfig(**base)  # type: ignore[arg-type]


async def wait_until(predicate: Callable[[], bool], limit_s: float = 10.0) -> None:
    """Poll `predicate` (state kept by py-libp2p has no event to wait on)."""
    with trio.fail_after(limit_s):
        while True:
            if predicate():
                return
            await trio.sleep(0.05)


@dataclass
class Node:
    key_pair: KeyPair
    discovery: Discovery | None = None
    addr: PeerInfo | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    stopping: trio.Event = field(default_factory=trio.Event)
    stopped: trio.Event = field(default_factory=trio.Event)

    @property
    def d(self) -> Discovery:
        assert self.discovery is not None
        return self.discovery

    @property
    def peer_id(self) -> PeerID:
        return PeerID.from_pubkey(self.key_pair.public_key)

    async def stop(self, *, crash: bool = False) -> None:
        """Stop the node: close its connections like an exiting process would,
        or (crash=True) just stop its tasks, leaving peers with half-open
        connections that never answer, like a hung or cut-off machine."""
        if crash:
            self.scope.cancel()
        self.stopping.set()
        with trio.fail_after(10):
            await self.stopped.wait()


async def _serve(
    node: Node,
    bootstrap: Sequence[PeerInfo],
    server: bool,
    config: DiscoveryConfig,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    try:
        with node.scope:
            host = build_host(node.key_pair, [LOOPBACK])
            async with host.run([LOOPBACK]), trio.open_nursery() as nursery:
                node.addr = info_from_p2p_addr(host.get_addrs()[0])
                node.discovery = Discovery(host, node.key_pair, server=server, bootstrap=bootstrap, config=config)
                await nursery.start(node.discovery.run)
                task_status.started()
                await node.stopping.wait()
                nursery.cancel_scope.cancel()
                with trio.move_on_after(5) as cleanup:
                    cleanup.shield = True
                    await host.get_network().close()
    finally:
        node.stopped.set()


async def start_node(
    nursery: trio.Nursery,
    bootstrap: Sequence[PeerInfo] = (),
    *,
    server: bool = True,
    config: DiscoveryConfig | None = None,
) -> Node:
    node = Node(create_new_key_pair())
    with trio.fail_after(30):
        await nursery.start(_serve, node, list(bootstrap), server, config or fast_config())
    return node


@asynccontextmanager
async def cluster(
    n: int, *, topology: str = "line", config: DiscoveryConfig | None = None
) -> AsyncIterator[list[Node]]:
    """`n` server nodes; each bootstraps from the previous one (a line) or, for
    "ring", the first also links to the last once all are up."""
    async with trio.open_nursery() as nursery:
        nodes: list[Node] = []
        for _ in range(n):
            boot = [nodes[-1].addr] if nodes else []
            nodes.append(await start_node(nursery, boot, config=config))  # type: ignore[list-item]
        if topology == "ring" and n > 2:
            assert nodes[-1].addr is not None
            with trio.fail_after(10):
                await nodes[0].d.host.connect(nodes[-1].addr)
        try:
            yield nodes
        finally:
            nursery.cancel_scope.cancel()
