"""NAT-traversal policy without sockets: reachability votes, reservation renewal, punch backoff,
connection kinds, relay limits (the limits also through py-libp2p's own resource manager)."""

from __future__ import annotations

import random

import pytest
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID as PeerID
from libp2p.relay.circuit_v2.resources import RelayResourceManager

from knexa.net.nat.autonat import dial_candidates
from knexa.net.nat.config import NatConfig, NatConfigError, RelayLimitsConfig
from knexa.net.nat.policy import (
    DIAL_ERROR,
    DIAL_OK,
    DIAL_REFUSED,
    PRIVATE,
    PUBLIC,
    UNKNOWN,
    PunchScheduler,
    ReachabilityTracker,
    ReservationBook,
    circuit_addr,
    connection_kind,
    should_initiate_punch,
)


def test_reachability_one_server_decides_when_it_is_the_only_one() -> None:
    tracker = ReachabilityTracker(confirmations=3)
    assert tracker.status == UNKNOWN
    assert tracker.record("relay", DIAL_ERROR, now=0) == PRIVATE


def test_reachability_needs_agreement_and_keeps_status_on_disagreement() -> None:
    tracker = ReachabilityTracker(confirmations=3)
    tracker.record("a", DIAL_OK, 0)
    assert tracker.status == PUBLIC
    tracker.record("b", DIAL_ERROR, 1)  # 1 ok, 1 error: no agreement, keep public
    assert tracker.status == PUBLIC
    tracker.record("c", DIAL_ERROR, 2)
    tracker.record("a", DIAL_ERROR, 3)  # a's newer verdict replaces its old one
    assert tracker.status == PRIVATE
    assert tracker.counts() == {"ok": 0, "error": 3}


def test_reachability_refusals_do_not_vote_and_old_votes_expire() -> None:
    tracker = ReachabilityTracker(max_age_s=100)
    tracker.record("a", DIAL_REFUSED, 0)
    assert tracker.status == UNKNOWN and not tracker.votes
    tracker.record("a", DIAL_OK, 0)
    assert tracker.decide(now=50) == PUBLIC
    assert tracker.decide(now=101) == UNKNOWN


def test_reachability_forced_and_bad_input() -> None:
    tracker = ReachabilityTracker(forced=PRIVATE)
    tracker.record("a", DIAL_OK, 0)
    assert tracker.status == PRIVATE
    with pytest.raises(ValueError):
        ReachabilityTracker(forced="sideways")
    with pytest.raises(ValueError):
        ReachabilityTracker().record("a", "maybe", 0)
    with pytest.raises(ValueError):
        ReachabilityTracker(confirmations=0)


def test_reservation_renewed_halfway_and_before_the_margin() -> None:
    book = ReservationBook(renew_fraction=0.5, min_margin_s=30)
    book.want("R", "/ip4/100.64.0.1/tcp/4001", now=0)
    assert book.due(0) == ["R"]
    renew_at = book.reserved("R", expires_at=3600, now=0)
    assert renew_at == 1800
    assert book.due(1799) == [] and book.due(1800) == ["R"]
    assert book.entries["R"].renewals == 0
    # Short reservations: halfway, and at the latest a quarter of the lifetime before expiry.
    assert book.reserved("R", expires_at=1800 + 10, now=1800) == 1800 + 5
    book2 = ReservationBook(renew_fraction=0.9, min_margin_s=30)
    book2.want("R", None, 0)
    assert book2.reserved("R", expires_at=100, now=0) == 75
    assert book2.reserved("R", expires_at=3600, now=0) == 3240
    assert book.entries["R"].renewals == 1


def test_reservation_failure_backs_off_and_an_unexpired_one_stays_active() -> None:
    book = ReservationBook(retry_initial_s=2, retry_max_s=60, rng=random.Random(1))
    book.want("R", None, 0)
    first = book.failed("R", "refused", now=0)
    second = book.failed("R", "refused", now=first)
    assert 1 <= first <= 2 and 2 <= second - first <= 4
    assert book.entries["R"].state == "failed" and book.entries["R"].last_error == "refused"
    book.reserved("R", expires_at=1000, now=10)
    retry = book.failed("R", "timeout", now=600)  # renewal failed; still 400 s left
    assert book.entries["R"].state == "active" and retry - 600 <= 200
    assert [e.relay for e in book.active(700)] == ["R"]
    assert book.due(1000) == ["R"] and book.entries["R"].state == "pending"  # expired meanwhile
    assert book.active(1000) == []


def test_reservation_backoff_is_capped() -> None:
    book = ReservationBook(retry_initial_s=2, retry_max_s=10, rng=random.Random(2))
    book.want("R", None, 0)
    now = 0.0
    for _ in range(20):
        nxt = book.failed("R", "x", now)
        assert nxt - now <= 10
        now = nxt


def test_circuit_addr() -> None:
    assert circuit_addr("/ip4/1.2.3.4/tcp/4001", "R", "ME") == "/ip4/1.2.3.4/tcp/4001/p2p/R/p2p-circuit/p2p/ME"
    assert circuit_addr("/ip4/1.2.3.4/tcp/4001/p2p/R", "R", "ME") == "/ip4/1.2.3.4/tcp/4001/p2p/R/p2p-circuit/p2p/ME"


def test_punch_scheduler_backoff_and_forgetting() -> None:
    punches = PunchScheduler(first_delay_s=1, retry_initial_s=10, retry_max_s=40)
    punches.relayed("P", now=0)
    assert punches.due(0.5) == [] and punches.due(1) == ["P"]
    assert punches.result("P", False, now=1) == 11
    assert punches.result("P", False, now=11) == 31
    assert punches.result("P", False, now=31) == 71  # capped at 40
    assert punches.result("P", True, now=71) is None
    assert punches.due(1000) == []
    punches.gone("P")
    punches.relayed("P", now=1000)
    assert punches.due(1001) == ["P"]


def test_connection_kinds_and_who_drives_dcutr() -> None:
    assert connection_kind("/p2p/R/p2p-circuit/p2p/X") == "relayed"
    assert connection_kind("/ip4/100.64.2.2/tcp/4001") == "direct"
    assert connection_kind("/ip4/100.64.2.2/tcp/4001", replaced_relay=True) == "hole-punched"
    assert should_initiate_punch("A", "B", relayed_inbound=True)
    assert not should_initiate_punch("A", "B", relayed_inbound=False)
    assert should_initiate_punch("A", "B", None) != should_initiate_punch("B", "A", None)


def test_autonat_dials_only_the_observed_ip() -> None:
    import multiaddr

    raw = [multiaddr.Multiaddr(a).to_bytes() for a in (
        "/ip4/192.168.1.2/tcp/4001", "/ip4/100.64.1.2/tcp/4001", "/ip4/10.0.0.1/tcp/5000",
        "/ip4/100.64.0.1/tcp/4001/p2p/12D3KooWD9mCJvsU6oYd7K5tnm3EQskdhr1Vnx8rckvBmwqdFg1H/p2p-circuit",
    )] + [b"\x00garbage"]
    got = [str(a) for a in dial_candidates(raw, "100.64.1.2")]
    assert got == ["/ip4/100.64.1.2/tcp/4001", "/ip4/100.64.1.2/tcp/5000"]
    many = [multiaddr.Multiaddr(f"/ip4/1.1.1.1/tcp/{p}").to_bytes() for p in range(1000, 1010)]
    assert len(dial_candidates(many, "9.9.9.9")) == 4


def test_nat_config_validation() -> None:
    NatConfig().validate()
    for bad in (NatConfig(reachability="maybe"), NatConfig(relay_service="yes"), NatConfig(hole_punch="1"),
                NatConfig(max_relays=-1), NatConfig(limits=RelayLimitsConfig(max_circuit_bytes=0)),
                NatConfig(limits=RelayLimitsConfig(reservation_ttl_s=5))):
        with pytest.raises(NatConfigError):
            bad.validate()


def _peer() -> PeerID:
    return PeerID.from_pubkey(create_new_key_pair().public_key)


def test_relay_limits_cap_reservations_and_expire_them(monkeypatch: pytest.MonkeyPatch) -> None:
    limits = RelayLimitsConfig(max_reservations=2, reservation_ttl_s=60, max_circuits_per_peer=1).validate()
    manager = RelayResourceManager(limits.to_libp2p())  # no host: py-libp2p's accounting alone
    a, b, c = _peer(), _peer(), _peer()
    clock = [1000.0]
    monkeypatch.setattr("libp2p.relay.circuit_v2.resources.time.time", lambda: clock[0])
    assert manager.reserve(a) == 60 and manager.reserve(b) == 60
    assert not manager.can_accept_reservation(c)  # full
    assert manager.can_accept_reservation(a)  # a renewal is always accepted
    reservation = manager.get_reservation(a)
    assert reservation is not None and reservation.can_accept_connection()
    reservation.active_connections = 1
    assert not manager.can_accept_connection(a)  # one circuit per peer
    clock[0] += 61
    assert manager.can_accept_reservation(c)  # a and b expired
    assert manager.get_reservation(a) is None


def test_relay_limits_map_onto_libp2p() -> None:
    limits = RelayLimitsConfig(max_reservations=3, reservation_ttl_s=120, max_circuit_duration_s=30,
                               max_circuit_bytes=1 << 20, max_circuits_per_peer=2).to_libp2p()
    assert (limits.max_reservations, limits.reservation_ttl, limits.duration, limits.data,
            limits.max_circuit_conns) == (3, 120, 30, 1 << 20, 2)


def test_direct_dials_skip_private_addresses_of_other_lans() -> None:
    from knexa.net.nat.policy import worth_direct_dial

    own = ["/ip4/192.168.2.2/tcp/4001/p2p/12D3KooWX", "/ip4/127.0.0.1/tcp/4001"]
    assert not worth_direct_dial("/ip4/192.168.1.2/tcp/4001", own)  # another home's LAN
    assert not worth_direct_dial("/ip4/10.0.0.1/tcp/4001", own)
    assert not worth_direct_dial("/ip4/0.0.0.0/tcp/4001", own)
    assert worth_direct_dial("/ip4/192.168.2.7/tcp/4001", own)  # our own LAN
    assert worth_direct_dial("/ip4/100.64.1.2/tcp/4001", own)  # shared / public space
    assert worth_direct_dial("/ip4/127.0.0.1/tcp/5000", own)
    assert worth_direct_dial("/ip6/2001:db8::1/tcp/4001", own)


def test_a_failing_relay_keeps_its_backoff_while_the_next_candidate_is_tried() -> None:
    book = ReservationBook(rng=random.Random(3))
    candidates = [("A", "/ip4/1.1.1.1/tcp/1"), ("B", "/ip4/2.2.2.2/tcp/1"), ("C", "/ip4/3.3.3.3/tcp/1")]
    book.track(candidates, max_relays=1, now=0)
    assert list(book.entries) == ["A"]
    book.failed("A", "no HOP protocol", now=0)
    book.track(candidates, max_relays=1, now=1)
    assert list(book.entries) == ["A", "B"]  # A still retried on its own schedule
    book.reserved("B", expires_at=3600, now=1)
    book.track(candidates, max_relays=1, now=2)
    assert list(book.entries) == ["A", "B"]  # one working reservation is enough
    book.track([("B", "/ip4/9.9.9.9/tcp/1")], max_relays=1, now=3)
    assert book.entries["B"].relay_addr == "/ip4/9.9.9.9/tcp/1"


def test_testbed_says_why_it_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    import knexa.net.nat.netns as netns

    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    assert "needs root" in (netns.unavailable_reason() or "")
    monkeypatch.setattr(netns.os, "geteuid", lambda: 0)
    monkeypatch.setattr(netns.shutil, "which", lambda tool: None if tool == "iptables" else "/sbin/ip")
    assert "`iptables` is not installed" in (netns.unavailable_reason() or "")
