"""Real daemons in one process: mesh formation, the local API, reconnects."""

from __future__ import annotations

import gc
import stat
import threading
import weakref
from collections.abc import AsyncIterator

import httpx
import multiaddr
import trio
from libp2p.network.connection.swarm_connection import SwarmConn
from libp2p.peer.id import ID as PeerID

from knexa.node import daemon as daemon_module
from knexa.node.body_limit import MAX_REQUEST_BYTES
from knexa.node.daemon import Daemon, DaemonError, run_until_signal
from knexa.node.errors import find_exception
from knexa.node.paths import STATE_FILE, TOKEN_FILE
from tests.conftest import (
    api_get,
    free_port,
    node_config,
    p2p_addr,
    peer_ids_seen,
    running_daemon,
    wait_for,
)


async def test_two_nodes_connect_via_bootstrap(tmp_path):
    async with running_daemon(tmp_path / "a") as a:
        async with running_daemon(tmp_path / "b", [p2p_addr(a)]) as b:
            await wait_for(lambda: _sees(a, {b.peer_id}))
            await wait_for(lambda: _sees(b, {a.peer_id}))
            peer = (await api_get(b, "/v1/peers")).json()["peers"][0]
            assert peer["direction"] == "outbound"
            assert peer["kind"] == "direct"
            assert peer["address"].startswith("/ip4/127.0.0.1/tcp/")
            await wait_for(lambda: _peer_field(b, a.peer_id, "rtt_ms"))
            await wait_for(lambda: _peer_field(b, a.peer_id, "agent"))
            agent = await _peer_field(b, a.peer_id, "agent")
            assert agent.startswith("knexa-node/")


async def test_three_nodes_each_see_the_others(tmp_path):
    async with running_daemon(tmp_path / "a") as a:
        async with running_daemon(tmp_path / "b", [p2p_addr(a)]) as b:
            async with running_daemon(tmp_path / "c", [p2p_addr(a), p2p_addr(b)]) as c:
                ids = {a.peer_id, b.peer_id, c.peer_id}
                for node in (a, b, c):
                    await wait_for(lambda node=node: _sees(node, ids - {node.peer_id}))


async def test_bootstrap_peer_that_restarts_is_reconnected(tmp_path):
    port = free_port()
    async with running_daemon(tmp_path / "a", port=port) as a:
        a_id, a_addr = a.peer_id, p2p_addr(a)
        async with running_daemon(tmp_path / "b", [a_addr]) as b:
            await wait_for(lambda: _sees(b, {a_id}))
    # b alone again; then a comes back on the same port with the same identity.
    async with running_daemon(tmp_path / "b", [a_addr]) as b:
        await trio.sleep(1.0)  # b fails to reach a and backs off
        assert await peer_ids_seen(b) == set()
        async with running_daemon(tmp_path / "a", port=port) as a:
            assert a.peer_id == a_id
            await wait_for(lambda: _sees(b, {a_id}), timeout_s=15)


async def test_api_requires_the_token(tmp_path):
    async with running_daemon(tmp_path / "a") as a:
        assert (await api_get(a, "/v1/health", token=None)).status_code == 200
        for path in ("/v1/node", "/v1/peers", "/metrics"):
            assert (await api_get(a, path, token=None)).status_code == 401
            assert (await api_get(a, path, token="wrong")).status_code == 401
            assert (await api_get(a, path)).status_code == 200
        token_file = tmp_path / "a" / TOKEN_FILE
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert a.api_url.startswith("http://127.0.0.1:")


async def test_node_info_openapi_and_metrics(tmp_path):
    async with running_daemon(tmp_path / "a") as a:
        async with running_daemon(tmp_path / "b", [p2p_addr(a)]) as b:
            await wait_for(lambda: _sees(a, {b.peer_id}))
            node = (await api_get(a, "/v1/node")).json()
            assert node["peer_id"] == a.peer_id
            assert node["listen_addrs"] == [p2p_addr(a)]
            assert node["peers_connected"] == 1
            assert node["uptime_s"] >= 0
            assert node["bytes_in"] > 0 and node["bytes_out"] > 0
            spec = (await api_get(a, "/openapi.json", token=None)).json()
            assert {"/v1/health", "/v1/node", "/v1/peers", "/metrics"} <= set(spec["paths"])
            text = (await api_get(a, "/metrics")).text
            metrics = _parse_metrics(text)
            assert metrics["knexa_peers_connected"] == 1
            assert metrics["knexa_received_bytes_total"] > 0
            assert metrics["knexa_sent_bytes_total"] > 0
            assert metrics["knexa_peer_connects_total"] == 1
            assert "knexa_streams_open" in metrics and "knexa_uptime_seconds" in metrics
            # The ledger's anti-entropy on connect went through the signed RPC layer.
            await wait_for(lambda: _has_metric(a, "knexa_rpc_calls_total"), 10)


async def test_state_file_exists_only_while_running(tmp_path):
    async with running_daemon(tmp_path / "a") as a:
        state = tmp_path / "a" / STATE_FILE
        assert state.exists()
        assert a.peer_id in state.read_text()
    assert not state.exists()


async def test_disconnect_is_noticed(tmp_path):
    async with running_daemon(tmp_path / "a") as a:
        async with running_daemon(tmp_path / "b", [p2p_addr(a)]) as b:
            await wait_for(lambda: _sees(a, {b.peer_id}))
        await wait_for(lambda: _sees_none(a))
        assert a.mesh.disconnects == 1


async def _sees(daemon, ids: set[str]) -> bool:
    return ids <= await peer_ids_seen(daemon)


async def _sees_none(daemon) -> bool:
    return not await peer_ids_seen(daemon)


async def _peer_field(daemon, peer_id: str, field: str):
    for peer in (await api_get(daemon, "/v1/peers")).json()["peers"]:
        if peer["peer_id"] == peer_id:
            return peer[field]
    return None


async def _has_metric(daemon, name: str) -> bool:
    text = (await api_get(daemon, "/metrics")).text
    return any(line.startswith(name + "{") for line in text.splitlines())


def _parse_metrics(text: str) -> dict[str, float]:
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


async def test_a_node_does_not_dial_peers_it_merely_knows(tmp_path):
    # py-libp2p's auto-connector would dial every peer in the peerstore (up to
    # 150 connections); the node's hosts keep it off and choose whom to dial.
    async with running_daemon(tmp_path / "a") as a, running_daemon(tmp_path / "b") as b:
        known = b.host.get_id()
        a.host.get_peerstore().add_addrs(known, b.host.get_addrs(), 3600)
        network = a.host.get_network()
        await network.auto_connector.maybe_connect()
        await trio.sleep(0.5)
        assert known not in a.host.get_connected_peers()
        assert not network.auto_connector._started  # its periodic dialling task never ran


async def _stop_network(daemon: Daemon) -> None:
    await daemon.host.get_network().manager.stop()


def _fail_a_swarm_task(daemon: Daemon) -> None:
    # py-libp2p stops the whole swarm when one of its tasks fails (a CI run caught a swarm stopped under a
    # running node once): its connections die with it while the host object lives on.
    async def fails() -> None:
        raise RuntimeError("a swarm task failed")

    daemon.host.get_network().manager.run_task(fails)


async def test_a_node_whose_network_stops_is_restarted_in_place_and_rejoins(tmp_path):
    async with running_daemon(tmp_path / "b") as b:
        made: list[Daemon] = []

        def new_daemon() -> Daemon:
            made.append(Daemon(node_config(tmp_path / "a", [p2p_addr(b)])))
            return made[-1]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_until_signal, new_daemon)
            await wait_for(lambda: made and made[0].api_url, 30)
            first = made[0]
            await wait_for(lambda: _sees(b, {first.peer_id}), 30)
            _fail_a_swarm_task(first)
            await wait_for(lambda: len(made) == 2 and made[1].api_url, 30)
            second = made[1]
            assert second.peer_id == first.peer_id
            assert (tmp_path / "a" / STATE_FILE).exists()
            await wait_for(lambda: _sees(b, {second.peer_id}), 30)
            await wait_for(lambda: _sees(second, {b.peer_id}), 30)
            nursery.cancel_scope.cancel()
        assert not (tmp_path / "a" / STATE_FILE).exists()


async def test_a_node_whose_network_keeps_stopping_gives_up_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(daemon_module, "RESTARTS", 1)
    monkeypatch.setattr(daemon_module, "RESTART_DELAY_S", 0.0)
    made: list[Daemon] = []

    def new_daemon() -> Daemon:
        made.append(Daemon(node_config(tmp_path / "a")))
        return made[-1]

    async def stop_each_network() -> None:
        for i in range(2):
            await wait_for(lambda i=i: len(made) > i and made[i].api_url, 30)
            await _stop_network(made[i])

    failure = None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop_each_network)
            with trio.fail_after(60):
                await run_until_signal(new_daemon)
    except BaseException as exc:  # noqa: BLE001 - the group trio wraps it in
        failure = find_exception(exc, DaemonError)
    assert failure is not None and "network service stopped" in str(failure)
    assert "not restarting again" in str(failure)
    assert len(made) == 2
    assert not (tmp_path / "a" / STATE_FILE).exists()


async def test_a_stopped_daemon_leaves_no_thread_behind(tmp_path):
    before = {t.ident for t in threading.enumerate()}
    async with running_daemon(tmp_path / "a") as a, running_daemon(tmp_path / "b", [p2p_addr(a)]) as b:
        await wait_for(lambda: _sees(b, {a.peer_id}))
    # trio keeps idle worker threads of its own for a while; anything else is left behind by a stopped node.
    left = [t.name for t in threading.enumerate() if t.ident not in before and not t.name.startswith("Trio thread")]
    assert not left


async def test_a_stopped_daemon_is_freed(tmp_path):
    # A node restarted in place makes a new Daemon in the same process; the old one, with everything it
    # holds, must go (FastAPI's process-wide caches kept every route closure, and so the daemon, alive).
    async with running_daemon(tmp_path / "a") as a:
        await api_get(a, "/v1/health")
        await api_get(a, "/v1/peers")
        stopped = weakref.ref(a)
    del a
    gc.collect()
    assert stopped() is None


async def test_an_oversized_request_body_is_refused_and_the_api_goes_on(tmp_path):
    async with running_daemon(tmp_path / "a") as a:
        headers = {"Authorization": f"Bearer {a.api_token}", "Content-Type": "application/json"}
        oversized = b'{"messages": [{"role": "user", "content": "' + b"x" * (MAX_REQUEST_BYTES + 1) + b'"}]}'

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: refused once past the cap
            for start in range(0, len(oversized), 1 << 20):
                yield oversized[start:start + (1 << 20)]

        async with httpx.AsyncClient(base_url=a.api_url, timeout=30) as client:
            announced = await client.post("/v1/chat/completions", content=oversized, headers=headers)
            streamed = await client.post("/v1/chat/completions", content=chunks(), headers=headers)
        for response in (announced, streamed):
            assert response.status_code == 413 and "larger than" in response.text
        assert (await api_get(a, "/v1/health")).status_code == 200


async def test_connect_says_when_the_peer_was_connected_already(tmp_path):
    async with running_daemon(tmp_path / "a") as a, running_daemon(tmp_path / "b") as b:
        headers = {"Authorization": f"Bearer {a.api_token}"}
        async with httpx.AsyncClient(base_url=a.api_url, timeout=30) as client:
            first = (await client.post("/v1/connect", json={"addr": p2p_addr(b)}, headers=headers)).json()
            elsewhere = f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{b.peer_id}"  # nothing listens there
            second = (await client.post("/v1/connect", json={"addr": elsewhere}, headers=headers)).json()
        assert first["peer_id"] == b.peer_id and first["already_connected"] is False
        assert second["peer_id"] == b.peer_id and second["already_connected"] is True


async def test_the_ledger_listing_filters_by_a_full_peer_id_and_refuses_a_shortened_one(tmp_path):
    async with running_daemon(tmp_path / "a") as a:
        await wait_for(lambda: a.ledger.entries())
        own = (await api_get(a, f"/v1/ledger?peer={a.peer_id}")).json()["entries"]
        assert own and {e["author"] for e in own} == {a.peer_id}
        shortened = await api_get(a, f"/v1/ledger?peer={a.peer_id[:6]}…{a.peer_id[-6:]}")  # as tables show it
        assert shortened.status_code == 400 and "not a peer id" in shortened.text


async def test_a_peer_whose_disconnect_went_unnoticed_is_dropped_and_not_dialled_back(tmp_path, monkeypatch):
    async with running_daemon(tmp_path / "a") as a, running_daemon(tmp_path / "b") as b:
        await a.mesh.connect(multiaddr.Multiaddr(p2p_addr(b)))  # neither is the other's bootstrap peer
        await wait_for(lambda: _sees(a, {b.peer_id}))
        await wait_for(lambda: _sees(b, {a.peer_id}))

        # py-libp2p forgets a connection whose close fails midway without telling its notifees.
        async def no_notice(self) -> None:
            return None

        monkeypatch.setattr(SwarmConn, "_notify_disconnected", no_notice)
        b_id = PeerID.from_base58(b.peer_id)
        await a.host.disconnect(b_id)
        await wait_for(lambda: _sees_none(a), 10)
        await wait_for(lambda: _sees_none(b), 10)
        assert a.mesh.disconnects == 1 and b.mesh.disconnects == 1
        assert not a.host.get_network().get_connections(b_id)  # the mesh's pings did not dial it back
