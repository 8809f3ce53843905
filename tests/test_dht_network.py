"""knexa.dht over real py-libp2p hosts on loopback (no mocks)."""

from __future__ import annotations

import logging
import random

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID as PeerID

from knexa.dht import (
    Discovery,
    DiscoveryError,
    RecordError,
    SignedRecord,
    model_key,
    prefix_key,
    record_key,
    sign_record,
)
from knexa.dht.keys import DhtKeyError
from knexa.dht.logs import DHT_SERVER_LOGGER
from knexa.net.host import build_host

from .dht_helpers import LOOPBACK, cluster, fast_config, start_node, wait_until


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def test_ten_nodes_find_every_provider():
    seen = _Collect()
    dht_logger = logging.getLogger(DHT_SERVER_LOGGER)
    dht_logger.addHandler(seen)
    try:
        await _ten_nodes_providers()
    finally:
        dht_logger.removeHandler(seen)
    noisy = [r for r in seen.records if "Failed to read DHT message" in r.getMessage()]
    assert noisy == [], "stream-close noise must not reach the log"


async def _ten_nodes_providers() -> None:
    # replication 4 instead of 20, so that records do not simply land on all
    # ten nodes; use_local=False makes every lookup go over the network
    async with cluster(10, topology="line", config=fast_config(k=4)) as nodes:
        for i, n in enumerate(nodes):
            await n.d.provide(model_key(f"model-{i}"))
        for i, n in enumerate(nodes):
            for j, m in enumerate(nodes):
                got = await n.d.find_providers(model_key(f"model-{j}"), limit=1, timeout=5, use_local=False)
                assert [p["peer_id"] for p in got] == [m.peer_id.to_base58()], (i, j)
                assert got[0]["addrs"], "providers come with addresses"
        stats = nodes[0].d.stats()
        assert stats["routing_table_size"] >= 5
        assert stats["lookups_done"] == 10 and stats["lookups_failed"] == 0
        assert stats["provided_keys"] == 1


async def test_hidden_peer_found_and_dialed_through_the_dht():
    async with cluster(10, topology="line") as nodes, trio.open_nursery() as nursery:
        # a peer that only ever connected to node 3
        hidden = await start_node(nursery, bootstrap=[])
        with trio.fail_after(10):
            await hidden.d.host.connect(nodes[3].addr)
        await wait_until(lambda: nodes[3].d.dht.routing_table.peer_in_table(hidden.peer_id))
        seeker = nodes[9].d
        assert hidden.peer_id not in seeker.host.get_connected_peers()
        assert hidden.peer_id not in seeker.host.get_peerstore().peer_ids()
        info = await seeker.connect_peer(hidden.peer_id.to_base58(), timeout=5)
        assert info["peer_id"] == hidden.peer_id.to_base58() and info["addrs"]
        assert hidden.peer_id in seeker.host.get_connected_peers()
        assert seeker.last_trace is not None and seeker.last_trace.hit_hops is not None
        nursery.cancel_scope.cancel()


async def test_providers_deduplicated_and_several():
    async with cluster(6, topology="ring") as nodes:
        key = prefix_key("ab" * 32, [1, 2, 3])
        for n in nodes[:3]:
            await n.d.provide(key)
            await n.d.provide(key)  # announcing twice must not duplicate
        got = await nodes[5].d.find_providers(key, limit=10, timeout=5)
        ids = [p["peer_id"] for p in got]
        assert sorted(ids) == sorted(n.peer_id.to_base58() for n in nodes[:3])
        assert await nodes[4].d.find_providers(model_key("nobody-serves-this"), timeout=5) == []
        assert nodes[4].d.stats()["lookups_failed"] == 1
        assert len(await nodes[5].d.find_providers(key, limit=1, timeout=5)) == 1


async def test_records_put_get_newer_seq_wins():
    async with cluster(5) as nodes:
        owner = nodes[0].d
        assert await owner.put_record("peer", b"v1") >= 3
        rec = await nodes[4].d.get_record(owner.host.get_id(), "peer", timeout=5)
        assert rec is not None and rec.value == b"v1"
        await owner.put_record("peer", b"v2")
        for n in nodes[1:]:
            rec = await n.d.get_record(owner.host.get_id().to_base58(), "peer", timeout=5)
            assert rec is not None and rec.value == b"v2", "a cached older copy must lose"
        assert await nodes[2].d.get_record(nodes[1].d.host.get_id(), "peer", timeout=5) is None


async def test_forged_records_rejected_on_put_and_get():
    async with cluster(5) as nodes:
        alice, bob, carol, mallory = (n.d for n in nodes[:4])
        key = record_key(alice.host.get_id(), "peer")
        kb = key.encode()
        # Mallory signs with her own key a record claiming to be Alice's
        mine = sign_record(mallory.key_pair, record_key(mallory.host.get_id(), "peer"), b"evil", seq=99, ttl=60)
        forged = SignedRecord(b"evil", alice.host.get_id().to_base58(), mine.expires_at, 99, mine.signature).encode()
        # on put: refused locally, and by a remote peer that is sent it directly
        with pytest.raises(RecordError):
            await mallory.put_raw(key, forged)
        assert await mallory.client.put_value(bob.host.get_id(), kb, forged) is False
        assert await mallory.client.put_value(bob.host.get_id(), kb, b"garbage") is False
        assert bob.dht.value_store.get(kb) is None
        # on get: a malicious server holds the forgery; honest readers discard it
        from libp2p.kad_dht.pb.kademlia_pb2 import Record

        for bad in (mallory, bob):
            bad.dht.value_store.put_record(kb, Record(key=kb, value=forged))
        assert await carol.get_record(alice.host.get_id(), "peer", timeout=5) is None
        assert carol.stats()["records_rejected"] >= 1
        await alice.put_record("peer", b"genuine")
        for bad in (mallory, bob):  # re-plant: the real record replaced the fake
            bad.dht.value_store.put_record(kb, Record(key=kb, value=forged))
        rec = await nodes[4].d.get_record(alice.host.get_id(), "peer", timeout=5)
        assert rec is not None and rec.value == b"genuine"


async def test_bad_input_gets_clear_errors():
    async with cluster(3) as nodes:
        d = nodes[0].d
        with pytest.raises(DhtKeyError):
            await d.find_peer("not-a-peer-id")
        with pytest.raises(DhtKeyError):
            await d.put_record("Bad Name!", b"x")
        with pytest.raises(RecordError):
            await d.put_record("peer", b"x" * 100_000)
        with pytest.raises(DiscoveryError):
            await d.provide(b"")
        unknown = PeerID.from_pubkey(create_new_key_pair().public_key)
        with trio.fail_after(10):
            assert await d.find_peer(unknown, timeout=3) is None
            with pytest.raises(DiscoveryError, match="not found"):
                await d.connect_peer(unknown, timeout=3)
        # a bootstrap address nobody listens on: start, no hang, empty table
        kp = create_new_key_pair()
        host = build_host(kp, [LOOPBACK])
        async with host.run([LOOPBACK]):
            dead = f"/ip4/127.0.0.1/tcp/9/p2p/{unknown.to_base58()}"
            lonely = Discovery(host, kp, bootstrap=[dead], config=fast_config())
            with trio.fail_after(10):
                async with lonely.running():
                    assert lonely.stats()["routing_table_size"] == 0
                    assert await lonely.find_providers(model_key("m"), timeout=2) == []
                    assert await lonely.get_record(unknown, "peer", timeout=2) is None
                    assert await lonely.put_record("peer", b"alone") == 0
            # clean shutdown: nothing of the service is left hooked into the host
            assert lonely._feed not in host.get_network().notifees
        with pytest.raises(DiscoveryError):
            Discovery(host, create_new_key_pair())
        with pytest.raises(DiscoveryError, match="bootstrap"):
            Discovery(host, kp, bootstrap=["not a multiaddr"])


async def test_client_mode_node_queries_but_is_not_routed_to():
    async with cluster(4) as nodes, trio.open_nursery() as nursery:
        client = await start_node(nursery, [nodes[0].addr], server=False)
        await nodes[1].d.provide(model_key("m"))
        got = await client.d.find_providers(model_key("m"), timeout=5)
        assert [p["peer_id"] for p in got] == [nodes[1].peer_id.to_base58()]
        await trio.sleep(0.3)
        for n in nodes:
            assert not n.d.dht.routing_table.peer_in_table(client.peer_id)
        nursery.cancel_scope.cancel()


async def test_republish_and_reannounce_in_background():
    cfg = fast_config(maintenance_tick=0.2, reannounce_interval=0.5)
    async with cluster(3, config=cfg) as nodes:
        d = nodes[0].d
        await d.put_record("peer", b"v", ttl=1.0)
        first = (await nodes[1].d.get_record(d.host.get_id(), "peer", timeout=5)).seq
        await d.provide(model_key("m"))
        before = d.stats()["announcements"]
        await trio.sleep(1.5)
        rec = await nodes[2].d.get_record(d.host.get_id(), "peer", timeout=5)
        assert rec is not None and rec.seq > first, "republished with a newer seq"
        assert d.stats()["announcements"] > before


async def test_churn_thirty_percent_down():
    # replication 4 (not 20) so that most nodes must really look records up,
    # and so that some replicas of most keys are among the stopped nodes
    async with cluster(10, topology="ring", config=fast_config(k=4)) as nodes:
        rng = random.Random(5)
        for i, n in enumerate(nodes):
            await n.d.provide(model_key(f"m{i}"))
            await n.d.put_record("peer", f"node {i}".encode())
        holders = [sum(1 for n in nodes if n.d.dht.provider_store.get_providers(model_key(f"m{j}"))) for j in range(10)]
        assert all(2 <= h <= 6 for h in holders), holders  # replicated, not everywhere
        # stop 3 nodes, among them replicas of as many keys as possible
        down = set(rng.sample(range(10), 3))
        for i in down:
            await nodes[i].stop()
        alive = [i for i in range(10) if i not in down]
        with trio.fail_after(60):
            for i in alive:
                for j in range(10):
                    got = await nodes[i].d.find_providers(model_key(f"m{j}"), limit=1, timeout=5)
                    assert [p["peer_id"] for p in got] == [nodes[j].peer_id.to_base58()]
                    rec = await nodes[i].d.get_record(nodes[j].peer_id, "peer", timeout=5)
                    assert rec is not None and rec.value == f"node {j}".encode()


async def test_hung_peers_are_skipped_after_one_timeout():
    """Crashed-without-closing peers leave half-open connections: each one costs
    a lookup one rpc timeout, then it is skipped and its connection dropped."""
    cfg = fast_config(k=4, rpc_timeout=1.0)
    async with cluster(8, topology="ring", config=cfg) as nodes:
        for i, n in enumerate(nodes):
            await n.d.provide(model_key(f"m{i}"))
        for i in (2, 5):
            await nodes[i].stop(crash=True)
        seeker = nodes[0].d
        with trio.fail_after(60):
            for j in range(8):
                got = await seeker.find_providers(model_key(f"m{j}"), limit=1, timeout=10, use_local=False)
                assert [p["peer_id"] for p in got] == [nodes[j].peer_id.to_base58()]
            crashed = {nodes[2].peer_id, nodes[5].peer_id}
            for j in range(8):
                await seeker.find_providers(model_key(f"m{j}"), limit=1, use_local=False)
                trace = seeker.last_trace
                assert trace is not None and trace.failed == 0, f"lookup {j} asked a dead peer again"
                assert crashed.isdisjoint(trace.answered)
