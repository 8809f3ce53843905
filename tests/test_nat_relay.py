"""Relay v2 on loopback with real daemons: reservations (limited, renewed), advertised circuit
addresses, a relayed connection carrying signed RPC, and a circuit cut at its byte limit."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import multiaddr
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID as PeerID

from knexa.net.host import build_host, close_host
from knexa.net.mesh import Mesh
from knexa.net.nat.config import NatConfig, RelayLimitsConfig
from knexa.net.nat.echo import measure_echo, register_echo
from knexa.net.nat.service import NatService
from knexa.net.rpc import RpcError, RpcService
from tests.conftest import wait_for


@dataclass
class NatNode:
    """A host with the mesh view, signed RPC and NAT traversal only: no DHT or ledger that would
    dial peers directly behind the test's back (everything here is on loopback)."""

    host: Any
    mesh: Mesh
    rpc: RpcService
    nat: NatService

    @property
    def peer_id(self) -> str:
        return str(self.host.get_id())

    def addr(self) -> str:
        return str(self.host.get_addrs()[0])


@asynccontextmanager
async def nat_node(bootstrap: list[str] | None = None, **settings: Any) -> AsyncIterator[NatNode]:
    key_pair = create_new_key_pair()
    listen = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
    host = build_host(key_pair, listen)
    boot = [multiaddr.Multiaddr(b) for b in bootstrap or []]
    mesh = Mesh(host, boot, ping_interval_s=0.5)
    rpc = RpcService(host, key_pair)
    register_echo(rpc)
    nat = NatService(host, mesh, NatConfig(**settings), relay_candidates=boot)
    async with host.run(listen), trio.open_nursery() as nursery:
        await nursery.start(mesh.run)
        await nursery.start(rpc.run)
        await nursery.start(nat.run)
        try:
            yield NatNode(host, mesh, rpc, nat)
        finally:
            nursery.cancel_scope.cancel()
            await close_host(host)


def limits(**kw: int) -> RelayLimitsConfig:
    return RelayLimitsConfig(**kw)


def reservation(daemon: NatNode) -> dict[str, Any] | None:
    entries = daemon.nat.stats()["reservations"]
    return entries[0] if entries else None


async def test_reservation_limits_renewal_and_relayed_rpc() -> None:
    relay_settings = dict(relay_service="on", reachability="public", hole_punch="off",
                          limits=limits(max_reservations=1, reservation_ttl_s=10))
    async with nat_node(**relay_settings) as relay:
        private = dict(reachability="private", hole_punch="off")
        async with nat_node([relay.addr()], **private) as a:
            await wait_for(lambda: a.nat.circuit_addrs(), timeout_s=20)
            circuit = a.nat.circuit_addrs()[0]
            assert circuit.endswith(f"/p2p/{relay.peer_id}/p2p-circuit/p2p/{a.peer_id}")
            # Advertised through the host's addresses, which identify sends to peers.
            assert circuit in [str(x) for x in a.host.get_addrs()]
            # The 10 s reservation is renewed before it lapses.
            await wait_for(lambda: (reservation(a) or {}).get("renewals", 0) >= 1, timeout_s=30)
            assert a.nat.circuit_addrs() == [circuit]

            async with nat_node([relay.addr()], **private) as b:
                # The relay holds one reservation at most: b is refused, with the reason.
                await wait_for(lambda: (reservation(b) or {}).get("last_error"), timeout_s=20)
                assert "RESOURCE_LIMIT_EXCEEDED" in reservation(b)["last_error"]
                assert b.nat.circuit_addrs() == []

                # b reaches a through a's circuit address, and signed RPC runs over it.
                peer_a = PeerID.from_base58(a.peer_id)
                assert await b.nat.connect_relayed(peer_a, [circuit]) == circuit
                await wait_for(lambda: any(p.peer_id == a.peer_id for p in b.mesh.peers()))
                seen = next(p for p in b.mesh.peers() if p.peer_id == a.peer_id)
                assert seen.kind == "relayed"
                result = await measure_echo(b.rpc, peer_a, 4096, 20)
                assert result["mismatches"] == 0
                assert result["rpc_paths"] and all("/p2p-circuit" in p for p in result["rpc_paths"])
                conns = b.host.get_network().get_connections(peer_a)
                assert all("/p2p-circuit" in str(x) for c in conns for x in c.get_transport_addresses())


async def test_relay_cuts_a_circuit_at_its_byte_limit() -> None:
    async with nat_node(relay_service="on", reachability="public", hole_punch="off",
                        limits=limits(max_circuit_bytes=64 * 1024)) as relay:
        private = dict(reachability="private", hole_punch="off")
        async with nat_node([relay.addr()], **private) as a, nat_node([relay.addr()], **private) as b:
            await wait_for(lambda: a.nat.circuit_addrs(), timeout_s=20)
            peer_a = PeerID.from_base58(a.peer_id)
            await b.nat.connect_relayed(peer_a, a.nat.circuit_addrs())
            small = await measure_echo(b.rpc, peer_a, 1024, 2)
            assert small["mismatches"] == 0
            failed = False
            try:
                await measure_echo(b.rpc, peer_a, 256 * 1024, 1, timeout_s=10)
            except RpcError:
                failed = True
            assert failed, "a 256 KiB echo crossed a relay limited to 64 KiB per circuit"
            await wait_for(lambda: not b.host.get_network().get_connections(peer_a), timeout_s=20)


async def test_unreachable_relay_is_an_error_not_a_hang() -> None:
    dead = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWD9mCJvsU6oYd7K5tnm3EQskdhr1Vnx8rckvBmwqdFg1H"
    async with nat_node(reachability="private", relays=(dead,), hole_punch="off") as a:
        await wait_for(lambda: (reservation(a) or {}).get("last_error"), timeout_s=30)
        assert reservation(a)["state"] == "failed"
        circuit = dead + "/p2p-circuit/p2p/12D3KooWBtGDBxkg54J8QZcdvRLyQZo5PHxDekWnZVcksjWiF454"
        try:
            await a.nat.connect_relayed(PeerID.from_base58(circuit.rsplit("/", 1)[1]), [circuit])
        except ConnectionError as exc:
            assert "127.0.0.1" in str(exc)
        else:
            raise AssertionError("a dial through a dead relay succeeded")


async def test_daemon_reports_nat_and_rejects_bad_connect_input(tmp_path: Path) -> None:
    from tests.conftest import running_daemon

    async with running_daemon(tmp_path / "n") as daemon:
        info = daemon.node_info()["nat"]
        assert info["reachability"] == "unknown" and info["relay_service"] is False
        async with httpx.AsyncClient(base_url=daemon.api_url, timeout=10,
                                     headers={"Authorization": f"Bearer {daemon.api_token}"}) as client:
            node = (await client.get("/v1/node")).json()
            assert node["nat"]["reachability_mode"] == "auto"
            for bad in ("/ip4/127.0.0.1/tcp/1", "not an address", "/ip4/127.0.0.1/tcp/1/p2p-circuit"):
                reply = await client.post("/v1/connect", json={"addr": bad})
                assert reply.status_code == 400, (bad, reply.text)
            gone = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWD9mCJvsU6oYd7K5tnm3EQskdhr1Vnx8rckvBmwqdFg1H"
            reply = await client.post("/v1/connect", json={"addr": gone + "/p2p-circuit/p2p/" + daemon.peer_id})
            assert reply.status_code == 502 and "cannot connect" in reply.json()["detail"]
            reply = await client.post("/v1/diag/echo", json={"peer": "nope"})
            assert reply.status_code == 400


async def test_status_and_peers_render_reachability_relays_and_kinds(tmp_path: Path) -> None:
    from rich.console import Console

    from knexa.cli.render import print_peers, print_status
    from tests.conftest import running_daemon

    async with running_daemon(tmp_path / "n") as daemon:
        info = daemon.node_info()
        info["nat"].update(relay_service=True, relay_addrs=["/ip4/100.64.0.1/tcp/4001/p2p/R/p2p-circuit/p2p/X"],
                           reservations=[{"relay": "12D3KooWRelayRelayRelay", "state": "active", "renew_in_s": 12.0,
                                          "expires_in_s": 30.0, "renewals": 1, "last_error": None}])
        console = Console(record=True, width=200)
        print_status(console, info)
        text = console.export_text()
        assert "reachability" in text and "unknown (AutoNAT: 0 dial-back(s) ok, 0 failed)" in text
        assert "serving as a relay" in text and "reserved, renews in 12s" in text and "/p2p-circuit/" in text
        peers = [{"peer_id": f"12D3KooW{k}Peer", "address": "/ip4/100.64.2.2/tcp/4001", "kind": k,
                  "direction": "outbound", "connected_at": 0.0, "rtt_ms": 1.0, "agent": None, "profile": None}
                 for k in ("direct", "relayed", "hole-punched")]
        console = Console(record=True, width=200)
        print_peers(console, info, peers)
        text = console.export_text()
        assert all(k in text for k in ("direct", "relayed", "hole-punched"))


async def test_dht_mode_follows_reachability(tmp_path: Path) -> None:
    from knexa.node.config import NodeConfig
    from knexa.node.daemon import Daemon

    def server(**kw: Any) -> bool:
        config = NodeConfig(data_dir=tmp_path / "d", listen=["/ip4/127.0.0.1/tcp/0"], model="none", **kw).validate()
        return Daemon(config).discovery.server

    assert server() and server(dht_mode="server", reachability="private")
    assert not server(reachability="private") and not server(dht_mode="client")
    from tests.conftest import running_daemon

    async with running_daemon(tmp_path / "n") as daemon:
        assert daemon.discovery.server
        daemon.nat.tracker.forced = "private"
        daemon.nat.tracker.decide(0)
        daemon._nat_changed()
        assert not daemon.discovery.server


async def test_relay_cuts_a_circuit_at_its_duration_limit() -> None:
    async with nat_node(relay_service="on", reachability="public", hole_punch="off",
                        limits=limits(max_circuit_duration_s=2)) as relay:
        private = dict(reachability="private", hole_punch="off")
        async with nat_node([relay.addr()], **private) as a, nat_node([relay.addr()], **private) as b:
            await wait_for(lambda: a.nat.circuit_addrs(), timeout_s=20)
            peer_a = PeerID.from_base58(a.peer_id)
            await b.nat.connect_relayed(peer_a, a.nat.circuit_addrs())
            assert (await measure_echo(b.rpc, peer_a, 1024, 2))["mismatches"] == 0
            # The mesh pings every 0.5 s, so traffic crosses the relay after the 2 s cap and it resets the circuit.
            await wait_for(lambda: not b.host.get_network().get_connections(peer_a), timeout_s=30)


async def test_relay_service_follows_reachability_in_auto_mode() -> None:
    async with nat_node(relay_service="auto", reachability="public") as public, \
            nat_node(relay_service="auto", reachability="private") as private, \
            nat_node(relay_service="off", reachability="public") as off:
        assert public.nat.relay_serving and not private.nat.relay_serving and not off.nat.relay_serving
        public.nat.tracker.forced = None
        public.nat.tracker.votes.clear()
        for server in ("s1", "s2", "s3"):
            public.nat.tracker.record(server, "error", 0)
        public.nat._apply_relay_service()
        assert not public.nat.relay_serving  # found private: stops serving


async def test_autonat_dials_back_on_a_fresh_connection_and_rate_limits() -> None:
    from knexa.net.host import dialable_addrs
    from knexa.net.nat.policy import DIAL_ERROR, DIAL_OK, DIAL_REFUSED

    async with nat_node(reachability="public", hole_punch="off") as server, \
            nat_node([], reachability="public", hole_punch="off") as client:
        await client.mesh.connect(multiaddr.Multiaddr(server.addr()))
        addrs = [multiaddr.Multiaddr(str(a).split("/p2p/")[0]) for a in dialable_addrs(client.host)]
        server_id = PeerID.from_base58(server.peer_id)
        assert await client.nat.autonat.ask(server_id, addrs) == DIAL_OK
        assert await client.nat.autonat.ask(server_id, addrs) == DIAL_REFUSED  # again within 10 s
        assert server.nat.autonat.served == 1 and server.nat.autonat.refused == 1
        # A port where nothing listens, and one where another peer (the server itself) answers:
        # the Noise handshake proves the wrong peer answered. Neither is a false "public".
        for wrong in ("/ip4/127.0.0.1/tcp/9", server.addr().split("/p2p/")[0]):
            server.nat.autonat._last_request.clear()
            assert await client.nat.autonat.ask(server_id, [multiaddr.Multiaddr(wrong)]) == DIAL_ERROR
