"""Merge laws of the pure CRDTs, and the hybrid logical clock's ordering."""

from __future__ import annotations

import sys
from functools import reduce
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from knexa.crdt.hlc import HybridClock, Timestamp
from knexa.crdt.lww_map import LWWMap
from knexa.crdt.orset import ORSet
from knexa.net.identity import peer_id_of

sys.path.insert(0, str(Path(__file__).parent))  # pytest runs with --import-mode=importlib
from crdt_helpers import KEY_PAIRS, unsigned_entry

AUTHORS = [peer_id_of(kp).to_base58() for kp in KEY_PAIRS[:3]]

entries = st.builds(
    lambda k, a, wall, counter, payload, deleted: unsigned_entry(
        f"profile/k{k}", AUTHORS[a], wall, counter, payload, deleted=deleted
    ),
    k=st.integers(0, 4),
    a=st.integers(0, 2),
    wall=st.integers(0, 5),
    counter=st.integers(0, 2),
    payload=st.sampled_from([b"\x01", b"\x02", b"\x03"]),
    deleted=st.booleans(),
)
lww_maps = st.lists(entries, max_size=8).map(LWWMap)

tags = st.sampled_from([f"t{i}" for i in range(6)])
elements = st.sampled_from(["a", "b", "c"])
orsets = st.builds(
    lambda adds, removed: ORSet(frozenset(adds), frozenset(removed)),
    st.lists(st.tuples(elements, tags), max_size=6),
    st.lists(tags, max_size=4),
)

LAWS = settings(max_examples=150, deadline=None)


@LAWS
@given(lww_maps, lww_maps)
def test_lww_merge_is_commutative(a: LWWMap, b: LWWMap) -> None:
    assert a.merged(b) == b.merged(a)


@LAWS
@given(lww_maps, lww_maps, lww_maps)
def test_lww_merge_is_associative(a: LWWMap, b: LWWMap, c: LWWMap) -> None:
    assert a.merged(b).merged(c) == a.merged(b.merged(c))


@LAWS
@given(lww_maps)
def test_lww_merge_is_idempotent(a: LWWMap) -> None:
    assert a.merged(a) == a


@LAWS
@given(st.lists(entries, max_size=10), st.randoms(use_true_random=False))
def test_lww_apply_order_does_not_matter(items: list, rnd) -> None:
    shuffled = items + items[: len(items) // 2]
    rnd.shuffle(shuffled)
    assert LWWMap(items) == LWWMap(shuffled)


def test_lww_ties_on_clock_are_broken_by_author() -> None:
    low, high = sorted(AUTHORS[:2])
    a = unsigned_entry("profile/k", low, 10, 0, b"\x01")
    b = unsigned_entry("profile/k", high, 10, 0, b"\x02")
    assert LWWMap([a, b]).get("profile/k") == b
    assert LWWMap([b, a]).get("profile/k") == b


def test_lww_tombstone_beats_older_write_in_any_order() -> None:
    write = unsigned_entry("profile/k", AUTHORS[0], 10)
    tombstone = unsigned_entry("profile/k", AUTHORS[0], 11, deleted=True)
    for order in ([write, tombstone], [tombstone, write]):
        state = LWWMap(order)
        assert state.get("profile/k") == tombstone
        assert list(state.live(0)) == []


def test_lww_pruned_key_does_not_come_back_from_an_older_copy() -> None:
    old = unsigned_entry("profile/k", AUTHORS[0], 10, expires_at_ms=5_000)
    new = unsigned_entry("profile/k", AUTHORS[0], 20, expires_at_ms=1_000)
    state = LWWMap([new])
    assert state.prune(now_ms=2_000, grace_ms=500) == ["profile/k"]
    assert not state.apply(old)
    assert list(state.live(3_000)) == []


@LAWS
@given(orsets, orsets)
def test_orset_merge_is_commutative(a: ORSet, b: ORSet) -> None:
    assert a.merge(b) == b.merge(a)


@LAWS
@given(orsets, orsets, orsets)
def test_orset_merge_is_associative(a: ORSet, b: ORSet, c: ORSet) -> None:
    assert a.merge(b).merge(c) == a.merge(b.merge(c))


@LAWS
@given(orsets)
def test_orset_merge_is_idempotent(a: ORSet) -> None:
    assert a.merge(a) == a


def test_orset_concurrent_add_survives_remove() -> None:
    base = ORSet().merge(ORSet().add("x", "t1"))
    removal = base.remove("x")  # has observed only t1
    concurrent_add = base.add("x", "t2")
    for merged in (
        base.merge(removal).merge(concurrent_add),
        base.merge(concurrent_add).merge(removal),
    ):
        assert merged.elements() == {"x"}
    assert base.merge(removal).elements() == frozenset()


@LAWS
@given(st.lists(st.one_of(st.integers(-5, 5), st.tuples(st.integers(0, 30), st.integers(0, 9)))))
def test_hlc_is_strictly_increasing_and_passes_observed(steps: list) -> None:
    wall = [10]
    clock = HybridClock(lambda: wall[0])
    last = Timestamp(-1, 0)
    for step in steps:
        if isinstance(step, int):
            wall[0] = max(0, wall[0] + step)  # the wall clock may go backwards
            ts = clock.now()
            assert ts > last
            last = ts
        else:
            remote = Timestamp(*step)
            clock.observe(remote)
            ts = clock.now()
            assert ts > remote and ts > last
            last = ts


def test_merge_of_many_is_the_same_folded_either_way() -> None:
    maps = [LWWMap([unsigned_entry(f"profile/k{i % 3}", AUTHORS[i % 3], i)]) for i in range(9)]
    left = reduce(LWWMap.merged, maps)
    right = reduce(lambda acc, m: m.merged(acc), maps)
    assert left == right
