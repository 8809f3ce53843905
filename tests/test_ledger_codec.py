"""The wire codec and the size-bounded batcher."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from knexa.crdt import codec
from knexa.crdt.digest import DEFAULT_BUCKETS, bucket_summary
from knexa.crdt.entry import Entry, canonical_packb

sys.path.insert(0, str(Path(__file__).parent))  # pytest runs with --import-mode=importlib
from crdt_helpers import KEY_PAIRS, FakeClock, make_ledger, sample_profile

WRITER = make_ledger(3, FakeClock())
ENTRIES: list[Entry] = [
    WRITER.orset_add("blobs", "x" * size) for size in (0, 10, 200, 900, 1000, 3, 512, 1024)
] + [WRITER.put_profile(sample_profile())]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(ENTRIES), max_size=40), st.integers(2_000, 20_000))
def test_batches_stay_under_the_limit_and_keep_every_entry_in_order(
    entries: list[Entry], limit: int
) -> None:
    batches = codec.encode_entry_batches(entries, max_bytes=limit)
    assert all(len(b) <= limit for b in batches)
    decoded = [e for b in batches for e in codec.decode_entries(b)]
    assert decoded == entries
    if entries:
        # Greedy packing: no two neighbouring batches would have fit in one.
        sizes = [len(b) for b in batches]
        assert all(a + b > limit for a, b in zip(sizes, sizes[1:], strict=False))


def test_default_batch_limit_is_256_kib_and_gossip_safe() -> None:
    many = [e for _ in range(300) for e in ENTRIES]
    batches = codec.encode_entry_batches(many)
    assert len(batches) > 1
    assert all(len(b) <= 256 * 1024 for b in batches)


def test_an_entry_larger_than_the_batch_limit_is_refused() -> None:
    with pytest.raises(ValueError, match="exceeds the batch limit"):
        codec.encode_entry_batches(ENTRIES, max_bytes=500)


def test_digest_and_bucket_summary_round_trip() -> None:
    digest = WRITER.digest(frozenset({0, 5, 255}))
    assert codec.decode_digest(codec.encode_digest(digest)) == digest
    full = WRITER.digest()
    assert codec.decode_digest(codec.encode_digest(full)) == full
    summary = bucket_summary(ENTRIES)
    assert summary.num_buckets == DEFAULT_BUCKETS
    assert codec.decode_bucket_summary(codec.encode_bucket_summary(summary)) == summary


def test_a_message_of_one_type_is_not_accepted_as_another() -> None:
    with pytest.raises(codec.CodecError):
        codec.decode_digest(codec.encode_entries(ENTRIES))
    with pytest.raises(codec.CodecError):
        codec.decode_entries(codec.encode_bucket_summary(bucket_summary(ENTRIES)))


def test_signed_bytes_format_is_stable() -> None:
    # Changing the canonical form silently would make every node reject every
    # other node's entries: this pins it.
    entry = Entry("profile/p", canonical_packb({"b": 1, "a": [True, None]}), 7, 1, "p", 9, False, b"")
    assert entry.signed_bytes.hex() == (
        "98b46b6e6578612e6c65646765722e656e7472792f31a970726f66696c652f70070"
        "1a17009c2c40982a16192c3c0a16201"
    )


def test_signatures_cover_the_canonical_bytes_only() -> None:
    entry = WRITER.put_report("subject", 0.25, "slow")
    public = KEY_PAIRS[3].public_key
    assert public.verify(entry.signed_bytes, entry.signature)
