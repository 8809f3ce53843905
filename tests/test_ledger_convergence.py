"""Replicas converge whatever the delivery order, and anti-entropy closes any gap."""

from __future__ import annotations

import sys
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from knexa.crdt import codec
from knexa.crdt.digest import differing_buckets
from knexa.crdt.entry import Entry
from knexa.crdt.ledger import Ledger

sys.path.insert(0, str(Path(__file__).parent))  # pytest runs with --import-mode=importlib
from crdt_helpers import FakeClock, make_ledger, sample_profile, state_of

ELEMENTS = ["gpu-pool", "code-experts", "relay"]


class SkewedClock(FakeClock):
    """A replica's wall clock: the shared time plus a fixed skew."""

    def __init__(self, base: FakeClock, skew_s: float) -> None:
        super().__init__()
        self._base = base
        self._skew = skew_s

    def __call__(self) -> float:
        return self._base.now + self._skew


def build_replicas(data: st.DataObject, count: int) -> tuple[FakeClock, list[Ledger]]:
    base = FakeClock()
    skews = data.draw(st.lists(st.floats(-20, 20), min_size=count, max_size=count))
    return base, [make_ledger(i, SkewedClock(base, s)) for i, s in enumerate(skews)]


def local_write(data: st.DataObject, replicas: list[Ledger]) -> list[Entry]:
    me = data.draw(st.integers(0, len(replicas) - 1))
    ledger = replicas[me]
    op = data.draw(st.sampled_from(["profile", "report", "retract", "add", "remove"]))
    if op == "profile":
        return [ledger.put_profile(sample_profile(data.draw(st.integers(0, 9))), ttl_s=3600)]
    if op == "report":
        subject = replicas[data.draw(st.integers(0, len(replicas) - 1))].peer_id
        return [ledger.put_report(subject, data.draw(st.sampled_from([0.0, 0.5, 1.0])), "t")]
    if op == "retract":
        return [ledger.retract_profile()]
    element = data.draw(st.sampled_from(ELEMENTS))
    if op == "add":
        return [ledger.orset_add("groups", element)]
    return ledger.orset_remove("groups", element)


def assert_converged(replicas: list[Ledger], now: float) -> None:
    first = replicas[0]
    for other in replicas[1:]:
        assert state_of(other) == state_of(first)
        assert other.profiles(now) == first.profiles(now)
        assert other.orset_members("groups", now) == first.orset_members("groups", now)
        for subject in replicas:
            assert other.reputation(subject.peer_id, now) == first.reputation(subject.peer_id, now)


@settings(max_examples=120, deadline=None)
@given(st.data())
def test_any_delivery_order_with_duplicates_converges(data: st.DataObject) -> None:
    count = data.draw(st.integers(3, 5))
    base, replicas = build_replicas(data, count)
    deltas: list[Entry] = []
    for _ in range(data.draw(st.integers(1, 25))):
        action = data.draw(st.sampled_from(["write", "write", "deliver", "tick"]))
        if action == "write":
            deltas.extend(local_write(data, replicas))
        elif action == "deliver" and deltas:
            target = replicas[data.draw(st.integers(0, count - 1))]
            picked = data.draw(st.lists(st.sampled_from(deltas), max_size=5))
            target.merge(picked)
        else:
            base.advance(data.draw(st.floats(0, 5)))
    # Eventually every replica hears every delta, in its own order, some twice.
    for replica in replicas:
        order = data.draw(st.permutations(deltas))
        extra = data.draw(st.lists(st.sampled_from(deltas), max_size=4)) if deltas else []
        for start in range(0, len(order), 3):
            result = replica.merge(order[start : start + 3] + extra[:1])
            assert result.rejected_by_reason == {}
            extra = extra[1:]
    assert_converged(replicas, base.now)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_one_anti_entropy_exchange_each_way_makes_two_replicas_equal(
    data: st.DataObject,
) -> None:
    base, (a, b) = build_replicas(data, 2)
    for _ in range(data.draw(st.integers(0, 20))):
        written = local_write(data, [a, b])
        if data.draw(st.booleans()):  # some deltas reach the other side, some are lost
            for ledger in (a, b):
                ledger.merge(written)
        base.advance(data.draw(st.floats(0, 2)))

    # Everything below crosses the codec, as it would cross the network.
    summary_of_a = codec.decode_bucket_summary(codec.encode_bucket_summary(a.bucket_summary()))
    buckets = differing_buckets(b.bucket_summary(), summary_of_a)
    digest_of_a = codec.decode_digest(codec.encode_digest(a.digest(buckets)))
    digest_of_b = codec.decode_digest(codec.encode_digest(b.digest(buckets)))
    for message in codec.encode_entry_batches(b.missing_for(digest_of_a), max_bytes=4096):
        assert a.merge_message(message).rejected_by_reason == {}
    for message in codec.encode_entry_batches(a.missing_for(digest_of_b), max_bytes=4096):
        assert b.merge_message(message).rejected_by_reason == {}

    assert_converged([a, b], base.now)
    assert a.bucket_summary() == b.bucket_summary()


def test_full_digest_without_buckets_also_converges() -> None:
    clock = FakeClock()
    a, b = make_ledger(0, clock), make_ledger(1, clock)
    a.put_profile(sample_profile(1))
    b.put_profile(sample_profile(2))
    shared = a.put_report(b.peer_id, 1.0, "fast")
    b.merge([shared])
    assert [e.key for e in b.missing_for(a.digest())] == [f"profile/{b.peer_id}"]
    a.merge(b.missing_for(a.digest()))
    b.merge(a.missing_for(b.digest()))
    assert state_of(a) == state_of(b)
    assert a.missing_for(b.digest()) == [] and b.missing_for(a.digest()) == []


def test_in_sync_replicas_exchange_nothing() -> None:
    clock = FakeClock()
    a, b = make_ledger(0, clock), make_ledger(1, clock)
    b.merge([a.put_profile(sample_profile())])
    assert differing_buckets(a.bucket_summary(), b.bucket_summary()) == frozenset()
    assert a.missing_for(b.digest(frozenset())) == []


def test_newer_local_write_is_announced_and_wins_everywhere() -> None:
    clock = FakeClock()
    a, b, c = (make_ledger(i, clock) for i in range(3))
    first = a.put_profile(sample_profile(queue_length=1))
    second = a.put_profile(sample_profile(queue_length=7))
    c.merge([second])
    c.merge([first])  # late, stale delta
    b.merge([first, second])
    for replica in (b, c):
        assert replica.profiles(clock.now)[a.peer_id].load.queue_length == 7
