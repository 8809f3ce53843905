"""The signed ledger entry and its canonical byte form.

The signature covers the canonical bytes: a msgpack array with a fixed field
order, prefixed by a domain tag so a ledger signature can never be replayed as
a signature for some other protocol message. The payload travels as the exact
bytes that were signed, so a receiver verifies without re-encoding anything.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import msgpack

from knexa.crdt.hlc import Timestamp

SIGNING_DOMAIN = "knexa.ledger.entry/1"
NEVER_EXPIRES = 0


class PayloadError(ValueError):
    """A value cannot be put into canonical msgpack form."""


def _canonical(value: Any) -> Any:
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise PayloadError("map keys must be strings")
        return {k: _canonical(value[k]) for k in sorted(value)}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str | bytes):
        return value
    raise PayloadError(f"unsupported payload type {type(value).__name__}")


def canonical_packb(value: Any) -> bytes:
    """msgpack with sorted map keys, so equal values always give equal bytes."""
    return msgpack.packb(_canonical(value), use_bin_type=True)


def unpack_payload(payload: bytes) -> Any:
    return msgpack.unpackb(payload, raw=False, strict_map_key=True)


@dataclass(frozen=True)
class Entry:
    key: str
    payload: bytes = field(repr=False)
    wall_ms: int
    counter: int
    author: str
    expires_at_ms: int
    deleted: bool
    signature: bytes = field(repr=False)

    @cached_property
    def signed_bytes(self) -> bytes:
        return signing_bytes(
            self.key,
            self.payload,
            self.wall_ms,
            self.counter,
            self.author,
            self.expires_at_ms,
            self.deleted,
        )

    @cached_property
    def content_hash(self) -> bytes:
        return hashlib.blake2b(self.signed_bytes, digest_size=16).digest()

    @cached_property
    def version(self) -> tuple[int, int, str, bytes]:
        """Last-writer-wins order: clock, then author id, then content hash.

        The hash only matters if one author signs two different entries at the
        same clock; it still gives every replica the same winner.
        """
        return (self.wall_ms, self.counter, self.author, self.content_hash)

    @property
    def timestamp(self) -> Timestamp:
        return Timestamp(self.wall_ms, self.counter)

    @property
    def size(self) -> int:
        return len(self.signed_bytes) + len(self.signature)

    def is_live(self, now_ms: int) -> bool:
        """Deterministic given the entry and `now_ms`, so replicas agree on expiry."""
        if self.deleted:
            return False
        return self.expires_at_ms == NEVER_EXPIRES or now_ms < self.expires_at_ms

    def value(self) -> Any:
        return unpack_payload(self.payload)


def signing_bytes(
    key: str,
    payload: bytes,
    wall_ms: int,
    counter: int,
    author: str,
    expires_at_ms: int,
    deleted: bool,
) -> bytes:
    return msgpack.packb(
        [SIGNING_DOMAIN, key, wall_ms, counter, author, expires_at_ms, deleted, payload],
        use_bin_type=True,
    )
