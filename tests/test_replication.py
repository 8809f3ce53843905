"""The ledger across real daemons: gossip deltas, anti-entropy, partitions, hostile input."""

from __future__ import annotations

import dataclasses
import os
import signal
import time

import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID as PeerID
from libp2p.peer.peerinfo import info_from_p2p_addr

from knexa.crdt import codec
from knexa.crdt.ledger import Ledger
from knexa.net.host import build_host, close_host, parse_multiaddr
from knexa.net.pubsub import open_pubsub
from knexa.net.rpc import RpcError, RpcService
from knexa.node.ledger_service import (
    METHOD_PUSH,
    METHOD_SUMMARY,
    TOPIC,
    PushRequest,
    PushResponse,
    SummaryMessage,
)
from knexa.node.testnet import LocalNode, start_daemon, stop_daemon, wait_until_started
from tests.conftest import api_get, p2p_addr, running_daemon, wait_for
from tests.crdt_helpers import resign

LOOPBACK = [parse_multiaddr("/ip4/127.0.0.1/tcp/0")]


async def _converged(nodes) -> bool:
    summaries = {n.ledger.bucket_summary() for n in nodes}
    return len(summaries) == 1


async def _connect(a, b) -> None:
    await a.host.connect(info_from_p2p_addr(b.host.get_addrs()[0]))


async def test_five_nodes_converge_on_profiles_and_writes(tmp_path):
    async with running_daemon(tmp_path / "n0") as n0:
        async with running_daemon(tmp_path / "n1", [p2p_addr(n0)]) as n1:
            async with running_daemon(tmp_path / "n2", [p2p_addr(n1)]) as n2:
                async with running_daemon(tmp_path / "n3", [p2p_addr(n2)]) as n3:
                    async with running_daemon(tmp_path / "n4", [p2p_addr(n3)]) as n4:
                        nodes = [n0, n1, n2, n3, n4]
                        ids = {n.peer_id for n in nodes}
                        for node in nodes:
                            await wait_for(lambda node=node: set(node.ledger.profiles()) == ids, 20)
                        # A write on every node reaches every other (a line: 4 hops for the ends).
                        for i, node in enumerate(nodes):
                            subject = nodes[(i + 1) % 5].peer_id
                            node.ledger_service.announce([node.ledger.put_report(subject, 0.9, "fast")])
                        await wait_for(lambda: _converged(nodes), 20)
                        for node in nodes:
                            assert len(node.ledger.entries()) == 10
                        listing = (await api_get(n4, "/v1/ledger")).json()
                        assert {e["author"] for e in listing["entries"]} == ids
                        assert all(e["verified"] for e in listing["entries"])
                        peers = (await api_get(n4, "/v1/peers")).json()["peers"]
                        assert peers[0]["profile"]["device"] == "cpu"


async def test_partition_heals_to_the_same_state(tmp_path):
    async with running_daemon(tmp_path / "a") as a, running_daemon(tmp_path / "c") as c:
        async with running_daemon(tmp_path / "b", [p2p_addr(a)]) as b:
            async with running_daemon(tmp_path / "d", [p2p_addr(c)]) as d:
                left, right = [a, b], [c, d]
                await wait_for(lambda: _converged(left), 15)
                await wait_for(lambda: _converged(right), 15)
                # Writes on both sides while partitioned, one of them to the same key.
                a.ledger_service.announce([a.ledger.put_report(c.peer_id, 0.2, "left view")])
                b.ledger_service.announce([b.ledger.put_report(d.peer_id, 0.4, "left")])
                d.ledger_service.announce([d.ledger.put_report(a.peer_id, 0.8, "right")])
                await wait_for(lambda: _converged(left), 15)
                await wait_for(lambda: _converged(right), 15)
                assert not await _converged([a, c])
                await _connect(b, c)  # heal
                await wait_for(lambda: _converged([a, b, c, d]), 20)
                assert len(a.ledger.entries()) == 4 + 3


async def test_hostile_entries_are_rejected_counted_and_not_spread(tmp_path):
    async with running_daemon(tmp_path / "a") as a, running_daemon(tmp_path / "b") as b:
        await _connect(b, a)
        await wait_for(lambda: _converged([a, b]), 15)
        before = {e.key: e for e in a.ledger.entries()}
        stranger = create_new_key_pair()
        genuine = Ledger(stranger).put_report(a.peer_id, 0.1, "spam")
        forged = dataclasses.replace(genuine, payload=b"\x91\x01")  # signature no longer matches
        other_namespace = resign(genuine, stranger, key=f"profile/{a.peer_id}")
        future = resign(genuine, stranger, wall_ms=genuine.wall_ms + 3_600_000)
        oversized = resign(genuine, stranger, payload=b"\xc4" + b"\x00" * 70_000)
        hostile = [forged, other_namespace, future, oversized]

        # Through the sync protocol: each rejected with its reason.
        batch = codec.encode_entries(hostile)
        reply = await b.rpc.call(
            PeerID.from_base58(a.peer_id), METHOD_PUSH, PushRequest(entries=[batch]), response_model=PushResponse
        )
        assert reply.accepted == 0
        assert sum(reply.rejected.values()) == 4
        # Garbage bytes on the sync protocol: a bad-request error, nothing changes.
        reply = await b.rpc.call(
            PeerID.from_base58(a.peer_id), METHOD_PUSH, PushRequest(entries=[b"\xff garbage"]),
            response_model=PushResponse,
        )
        assert reply.rejected == {"undecodable": 1}
        try:
            await b.rpc.call(PeerID.from_base58(a.peer_id), METHOD_PUSH, {"entries": "nope"})
            raise AssertionError("expected a bad request")
        except RpcError as err:
            assert err.code.name == "BAD_REQUEST"

        # Through gossip, from a raw attacker host with no ledger of its own.
        attacker = build_host(create_new_key_pair(), LOOPBACK)
        async with attacker.run(LOOPBACK), open_pubsub(attacker) as pubsub:
            await pubsub.subscribe(TOPIC)
            await attacker.connect(info_from_p2p_addr(a.host.get_addrs()[0]))
            await trio.sleep(1.5)  # a heartbeat, so the attacker is in a's mesh
            await pubsub.publish(TOPIC, codec.encode_entries([forged]))
            await pubsub.publish(TOPIC, b"\x00\x01garbage")
            await wait_for(lambda: a.ledger.counters.rejected.get("undecodable", 0) >= 2, 10)
            await wait_for(lambda: a.ledger.counters.rejected.get("bad_signature", 0) >= 2, 10)
            await close_host(attacker)

        # Nothing hostile got in; the two nodes' own profiles may have been refreshed meanwhile.
        after = {e.key: e for e in a.ledger.entries()}
        assert after.keys() == before.keys() and {e.author for e in after.values()} <= {a.peer_id, b.peer_id}
        stats = (await api_get(a, "/v1/ledger")).json()["stats"]
        assert sum(stats["rejected"].values()) >= 6
        assert (await api_get(a, "/v1/health")).status_code == 200
        await trio.sleep(0.5)
        assert not any(e.author == str(PeerID.from_pubkey(stranger.public_key)) for e in b.ledger.entries())


def test_sigkill_and_restart_keeps_what_was_acknowledged(tmp_path):
    a = LocalNode(0, tmp_path / "a", None)
    b = LocalNode(1, tmp_path / "b", None)
    for node in (a, b):
        node.data_dir.mkdir()
    a.process = start_daemon(a.data_dir, [], a.data_dir / "daemon.log")
    try:
        wait_until_started(a)
        b.process = start_daemon(b.data_dir, [a.addr], b.data_dir / "daemon.log")
        wait_until_started(b)
        deadline = time.monotonic() + 20
        while len(a.get("/v1/ledger")["entries"]) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        acknowledged = {e["key"] for e in a.get("/v1/ledger")["entries"]}
        assert len(acknowledged) == 2
        os.kill(a.process.pid, signal.SIGKILL)
        a.process.wait()
    finally:
        stop_daemon(a.process)
        if b.process is not None:
            stop_daemon(b.process)
    (a.data_dir / "daemon.json").unlink(missing_ok=True)  # left behind by the kill
    a.process = start_daemon(a.data_dir, [], a.data_dir / "daemon.log")
    try:
        wait_until_started(a)
        entries = a.get("/v1/ledger")["entries"]
        assert acknowledged <= {e["key"] for e in entries}
        assert all(e["verified"] for e in entries)
    finally:
        stop_daemon(a.process)


async def test_a_peer_that_never_answers_sync_only_fails_that_sync(tmp_path):
    async with running_daemon(tmp_path / "a") as a:
        a.ledger_service.sync_timeout_s = 1.0
        stalled = trio.Event()

        async def never_answer(request, ctx):
            stalled.set()
            await trio.sleep_forever()

        key_pair = create_new_key_pair()
        slow = build_host(key_pair, LOOPBACK)
        async with slow.run(LOOPBACK):
            rpc = RpcService(slow, key_pair)
            rpc.register(METHOD_SUMMARY, never_answer, SummaryMessage, SummaryMessage)
            async with rpc.running():
                await slow.connect(info_from_p2p_addr(a.host.get_addrs()[0]))
                await wait_for(lambda: a.ledger_service.syncs_failed >= 1, 10)
                assert stalled.is_set()
            await close_host(slow)
        assert (await api_get(a, "/v1/health")).status_code == 200
        a.ledger_service.announce([a.ledger.put_report(a.peer_id[::-1], 0.5, "still writing")])
        assert (await api_get(a, "/v1/ledger")).json()["stats"]["entries"] == 2
