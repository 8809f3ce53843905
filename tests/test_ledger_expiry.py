"""Expiry is a deterministic function of the entry and `now`, so all replicas agree."""

from __future__ import annotations

import sys
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from knexa.crdt.ledger import Ledger

sys.path.insert(0, str(Path(__file__).parent))  # pytest runs with --import-mode=importlib
from crdt_helpers import FakeClock, make_ledger, sample_profile, state_of


def mesh(clock: FakeClock, count: int = 4) -> list[Ledger]:
    return [make_ledger(i, clock) for i in range(count)]


def gossip(replicas: list[Ledger]) -> None:
    for a in replicas:
        for b in replicas:
            if a is not b:
                b.merge(a.missing_for(b.digest()))


def test_profile_not_refreshed_within_its_ttl_disappears_everywhere() -> None:
    clock = FakeClock()
    replicas = mesh(clock)
    quiet, busy = replicas[0], replicas[1]
    quiet.put_profile(sample_profile(), ttl_s=60)
    busy.put_profile(sample_profile(), ttl_s=60)
    gossip(replicas)
    assert all(set(r.profiles()) == {quiet.peer_id, busy.peer_id} for r in replicas)

    for _ in range(4):  # only `busy` keeps refreshing
        clock.advance(20)
        busy.put_profile(sample_profile(queue_length=2), ttl_s=60)
        gossip(replicas)
    assert all(set(r.profiles()) == {busy.peer_id} for r in replicas)

    clock.advance(61)
    assert all(r.profiles() == {} for r in replicas)


def test_expiry_is_exact_at_the_deadline() -> None:
    clock = FakeClock()
    writer, reader = mesh(clock, 2)
    entry = writer.put_profile(sample_profile(), ttl_s=30)
    reader.merge([entry])
    deadline = entry.expires_at_ms / 1000
    assert writer.peer_id in reader.profiles(deadline - 0.001)
    assert writer.peer_id not in reader.profiles(deadline)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 3), st.floats(1, 100), st.floats(0, 50)), max_size=12),
    st.floats(0, 400),
)
def test_replicas_agree_on_the_live_set_at_any_time(writes: list, probe: float) -> None:
    clock = FakeClock()
    replicas = mesh(clock)
    for author, ttl, pause in writes:
        replicas[author].put_profile(sample_profile(), ttl_s=ttl)
        clock.advance(pause)
    gossip(replicas)
    now = clock.now + probe
    views = [r.profiles(now) for r in replicas]
    assert all(v == views[0] for v in views)


def test_retracted_profile_disappears_everywhere() -> None:
    clock = FakeClock()
    replicas = mesh(clock, 3)
    replicas[0].put_profile(sample_profile())
    gossip(replicas)
    replicas[0].retract_profile()
    gossip(replicas)
    assert all(r.profiles() == {} for r in replicas)


def test_retracted_learning_membership_disappears_everywhere() -> None:
    clock = FakeClock()
    replicas = mesh(clock, 3)
    replicas[0].put_learn("member", {"accuracy": 0.5, "skills": {}}, ttl_s=120)
    gossip(replicas)
    assert all(replicas[0].peer_id in r.learn_entries("member") for r in replicas)
    replicas[0].retract_learn("member", ttl_s=120)
    gossip(replicas)
    assert all(r.learn_entries("member") == {} for r in replicas)


def test_expired_reports_stop_counting() -> None:
    clock = FakeClock()
    reporter, subject = mesh(clock, 2)
    subject.merge([reporter.put_report(subject.peer_id, 0.0, "wrong answers", ttl_s=10)])
    assert subject.reputation(subject.peer_id).report_count == 1
    clock.advance(11)
    assert subject.reputation(subject.peer_id).report_count == 0


def test_reputations_of_many_subjects_match_one_at_a_time() -> None:
    clock = FakeClock()
    a, b, c = mesh(clock, 3)
    entries = [a.put_report(b.peer_id, 0.0, "wrong answers", ttl_s=60), a.put_report(c.peer_id, 1.0, "", ttl_s=60),
               b.put_report(c.peer_id, 0.5, "", ttl_s=60), c.put_report(c.peer_id, 0.0, "self", ttl_s=60)]
    a.merge(entries)
    subjects = [a.peer_id, b.peer_id, c.peer_id, "no-such-peer"]
    together = a.reputations(subjects)
    assert together == {s: a.reputation(s) for s in subjects}
    assert [together[s].report_count for s in subjects] == [0, 1, 2, 0]  # the self-report does not count


def test_prune_forgets_long_expired_entries_without_resurrection() -> None:
    clock = FakeClock()
    writer, pruner, laggard = mesh(clock, 3)
    old = writer.put_profile(sample_profile(), ttl_s=3600)
    laggard.merge([old])
    newer = writer.put_profile(sample_profile(queue_length=1), ttl_s=5)
    pruner.merge([newer])
    clock.advance(100)
    assert pruner.prune(grace_s=60) == 1
    assert pruner.entries() == []
    # The laggard still holds the older, longer-lived version and offers it.
    result = pruner.merge(laggard.missing_for(pruner.digest()))
    assert result.accepted == [] and result.superseded == 1
    assert pruner.profiles() == {}
    assert state_of(pruner) == {}


def test_orset_adds_with_ttl_expire_and_removes_are_observed() -> None:
    clock = FakeClock()
    a, b = mesh(clock, 2)
    a.orset_add("relays", "r1", ttl_s=30)
    b.orset_add("relays", "r1")
    b.orset_add("relays", "r2")
    gossip([a, b])
    assert a.orset_members("relays") == b.orset_members("relays") == {"r1", "r2"}
    b.orset_remove("relays", "r1")
    gossip([a, b])
    assert a.orset_members("relays") == {"r1", "r2"}  # a's own add of r1 still stands
    clock.advance(31)
    assert a.orset_members("relays") == b.orset_members("relays") == {"r2"}


def test_orset_remove_tombstone_expires_with_the_add_it_removes() -> None:
    clock = FakeClock()
    (a,) = mesh(clock, 1)
    add = a.orset_add("relays", "r1", ttl_s=30)
    (tombstone,) = a.orset_remove("relays", "r1")
    assert tombstone.deleted and tombstone.key == add.key
    assert tombstone.expires_at_ms == add.expires_at_ms
    assert a.orset_members("relays") == frozenset()
