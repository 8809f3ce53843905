"""Anti-entropy: summaries of a state and the entries a peer is missing.

One exchange between replicas A and B (the network layer carries the bytes):

1. A sends `bucket_summary(A)`; B finds `differing_buckets` against its own.
2. Each side sends `digest_of(state, buckets)` for those buckets only.
3. Each side answers the other's digest with `missing_for(state, digest)`:
   exactly the entries the other lacks or holds an older version of.

After each side merges what it received, both states are equal. Step 1 keeps
the traffic proportional to the difference when replicas are nearly in sync.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from knexa.crdt.entry import Entry
from knexa.crdt.lww_map import Version

DEFAULT_BUCKETS = 256
_HASH_BYTES = 16


def bucket_of(key: str, num_buckets: int) -> int:
    return zlib.crc32(key.encode()) % num_buckets


@dataclass(frozen=True)
class Digest:
    """Per-key versions of a state, restricted to `buckets` (None: every key)."""

    versions: Mapping[str, Version]
    buckets: frozenset[int] | None = None
    num_buckets: int = DEFAULT_BUCKETS

    def covers(self, key: str) -> bool:
        return self.buckets is None or bucket_of(key, self.num_buckets) in self.buckets


@dataclass(frozen=True)
class BucketSummary:
    """One hash per bucket of keys: equal hashes mean (almost surely) equal buckets."""

    hashes: tuple[bytes, ...]

    @property
    def num_buckets(self) -> int:
        return len(self.hashes)


def digest_of(
    entries: Iterable[Entry],
    buckets: frozenset[int] | None = None,
    num_buckets: int = DEFAULT_BUCKETS,
) -> Digest:
    versions = {
        e.key: e.version
        for e in entries
        if buckets is None or bucket_of(e.key, num_buckets) in buckets
    }
    return Digest(versions, buckets, num_buckets)


def bucket_summary(entries: Iterable[Entry], num_buckets: int = DEFAULT_BUCKETS) -> BucketSummary:
    # XOR is order-independent, and each key occurs once per state, so
    # identical buckets always hash alike however they were built.
    acc = [0] * num_buckets
    for e in entries:
        acc[bucket_of(e.key, num_buckets)] ^= int.from_bytes(e.content_hash, "big")
    return BucketSummary(tuple(h.to_bytes(_HASH_BYTES, "big") for h in acc))


def differing_buckets(local: BucketSummary, remote: BucketSummary) -> frozenset[int]:
    if local.num_buckets != remote.num_buckets:
        return frozenset(range(local.num_buckets))
    pairs = zip(local.hashes, remote.hashes, strict=True)
    return frozenset(i for i, (a, b) in enumerate(pairs) if a != b)


def missing_for(entries: Iterable[Entry], remote: Digest) -> list[Entry]:
    """The entries in scope of `remote` that it lacks or holds an older version of."""
    out = []
    for e in entries:
        if not remote.covers(e.key):
            continue
        theirs = remote.versions.get(e.key)
        if theirs is None or theirs < e.version:
            out.append(e)
    return out
