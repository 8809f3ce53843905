"""Discovery wired into real daemons: model providers and peer addresses through the DHT."""

from __future__ import annotations

import httpx
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID as PeerID

from tests.conftest import api_get, p2p_addr, running_daemon, wait_for
from tests.test_inference import _ready, tiny_model  # noqa: F401 - the module fixture


async def test_a_node_finds_a_model_and_its_server_two_hops_away(tmp_path, tiny_model):  # noqa: F811
    async with running_daemon(tmp_path / "a", model=tiny_model) as a:
        async with running_daemon(tmp_path / "b", [p2p_addr(a)]) as b:
            async with running_daemon(tmp_path / "c", [p2p_addr(b)]) as c:
                await wait_for(lambda: _ready(a), 60)
                name = (await api_get(a, "/v1/engine")).json()["model"]["name"]

                async def c_finds_a() -> bool:
                    found = (await api_get(c, f"/v1/find/model/{name}")).json()["providers"]
                    return a.peer_id in {p["peer_id"] for p in found}

                await wait_for(c_finds_a, 30, step_s=0.5)
                peer = (await api_get(c, f"/v1/find/peer/{a.peer_id}")).json()
                assert peer["peer_id"] == a.peer_id
                assert any(addr.startswith("/ip4/127.0.0.1/tcp/") for addr in peer["addrs"])
                stats = (await api_get(c, "/v1/node")).json()["dht"]
                assert stats["mode"] == "server" and stats["routing_table_size"] >= 1
                assert stats["lookups_done"] >= 2

                unknown = str(PeerID.from_pubkey(create_new_key_pair().public_key))
                assert (await api_get(c, f"/v1/find/peer/{unknown}")).status_code == 404
                assert (await api_get(c, "/v1/find/peer/not-a-peer-id")).status_code == 400
                assert (await api_get(c, "/v1/find/peer/garbage")).status_code == 400  # base58, not a multihash
                nothing = (await api_get(c, "/v1/find/model/no-such-model")).json()
                assert nothing["providers"] == []


async def test_rpc_to_a_peer_never_met_resolves_it_through_the_dht(tmp_path, tiny_model):  # noqa: F811
    async with running_daemon(tmp_path / "a", model=tiny_model) as a:
        async with running_daemon(tmp_path / "b", [p2p_addr(a)]) as b:
            async with running_daemon(tmp_path / "c", [p2p_addr(b)]) as c:
                await wait_for(lambda: _ready(a), 60)
                a_id = PeerID.from_base58(a.peer_id)
                await wait_for(lambda: a.discovery.stats()["routing_table_size"] >= 1, 15)
                # c forgets a completely: no connection, no addresses.
                if c.host.get_network().get_connections(a_id):
                    await c.host.disconnect(a_id)
                c.host.get_peerstore().clear_addrs(a_id)
                lookups_before = c.discovery.stats()["lookups_done"]
                # No checkpoint since the addresses were cleared, so nothing can have
                # re-taught them: only the DHT can find a now.
                await c.rpc.resolve_peer(a_id)
                assert c.discovery.stats()["lookups_done"] > lookups_before
                assert c.host.get_network().get_connections(a_id)
                body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "peer": a.peer_id}
                async with httpx.AsyncClient(base_url=c.api_url, timeout=60) as client:
                    response = await client.post(
                        "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {c.api_token}"}
                    )
                assert response.status_code == 200, response.text
