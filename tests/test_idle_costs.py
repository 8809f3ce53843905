"""What an idle node's background work was cut to, and that the behaviour stayed:
pings bounded per node, IDONTWANT only for large messages, the host's address list
reused until a circuit address changes, the hole-punch loop woken by connections."""

from __future__ import annotations

import time

from libp2p.peer.id import ID as PeerID
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V12
from libp2p.pubsub.pb import rpc_pb2

from knexa.net.mesh import MAX_PINGS_PER_S, ping_interval
from knexa.net.nat.policy import PunchScheduler
from knexa.net.pubsub import IDONTWANT_MIN_BYTES, build_gossipsub
from tests.conftest import wait_for
from tests.test_nat_relay import nat_node


def test_ping_interval_is_stretched_only_in_large_meshes() -> None:
    assert ping_interval(5.0, 4) == 5.0
    assert ping_interval(5.0, 50) == 50 / MAX_PINGS_PER_S
    assert 50 / ping_interval(5.0, 50) <= MAX_PINGS_PER_S


def test_punch_scheduler_next_due() -> None:
    punches = PunchScheduler(first_delay_s=1, retry_initial_s=10)
    assert punches.next_due() is None
    punches.relayed("P", now=100)
    assert punches.next_due() == 101
    punches.result("P", False, now=101)
    assert punches.next_due() == 111
    punches.result("P", True, now=111)
    assert punches.next_due() is None  # nothing left to retry: the loop sleeps until a connection changes


async def test_idontwant_is_sent_only_for_large_messages() -> None:
    router = build_gossipsub()
    sent: list[tuple[list[bytes], PeerID]] = []

    async def emit_idontwant(msg_ids: list[bytes], peer: PeerID) -> None:
        sent.append((msg_ids, peer))

    peer = PeerID(b"\x00\x01peer")
    router.emit_idontwant = emit_idontwant  # type: ignore[method-assign]
    router.pubsub = object()  # type: ignore[assignment]  # only checked for None here
    router.mesh = {"t": {peer}}
    router.peer_protocol = {peer: PROTOCOL_ID_V12}
    for size, expected in ((IDONTWANT_MIN_BYTES - 100, 0), (IDONTWANT_MIN_BYTES + 100, 1)):
        message = rpc_pb2.Message(from_id=b"origin", seqno=size.to_bytes(8, "big"), data=b"x" * size,
                                  topicIDs=["t"])
        router.mcache.put(message)
        sent.clear()
        await router._emit_idontwant_for_message(message.from_id + message.seqno, ["t"])
        assert len(sent) == expected, size


async def test_host_addresses_are_cached_but_show_a_new_circuit_at_once() -> None:
    async with nat_node(reachability="private", hole_punch="off") as node:
        first = node.host.get_addrs()
        assert node.host.get_addrs() == first
        relay = "12D3KooWRBy97UB99e3J6hiPesre1MZeuNQvfan4gBziswrRJsNK"
        now = time.time()
        node.nat.book.track([(relay, "/ip4/127.0.0.1/tcp/1")], 1, now)
        node.nat.book.reserved(relay, now + 60, now)
        circuit = node.nat.circuit_addrs()[0]
        assert circuit in [str(a) for a in node.host.get_addrs()]
        node.nat.book.drop(relay)
        assert circuit not in [str(a) for a in node.host.get_addrs()]


async def test_relayed_connection_is_hole_punched_without_polling() -> None:
    """The punch loop sleeps while nothing is relayed; a new relayed connection wakes it, and
    on loopback DCUtR's direct dial succeeds."""
    async with nat_node(relay_service="on", reachability="public", hole_punch="off") as relay:
        private = dict(reachability="private", hole_punch="on")
        async with nat_node([relay.addr()], **private) as a, nat_node([relay.addr()], **private) as b:
            await wait_for(lambda: a.nat.circuit_addrs(), timeout_s=20)
            peer_a = PeerID.from_base58(a.peer_id)
            await b.nat.connect_relayed(peer_a, a.nat.circuit_addrs())
            await wait_for(lambda: any(p["ok"] for p in b.nat.punch_log + a.nat.punch_log), timeout_s=30)
            seen = next(p for p in b.mesh.peers() if p.peer_id == a.peer_id)
            assert seen.kind == "hole-punched"
