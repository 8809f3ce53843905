"""Discovery wired into real daemons: model providers and peer addresses through the DHT."""

from __future__ import annotations

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
                nothing = (await api_get(c, "/v1/find/model/no-such-model")).json()
                assert nothing["providers"] == []
