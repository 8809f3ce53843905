"""Wire format for entry batches, digests and bucket summaries (msgpack).

Every message is `[PROTOCOL, message type, body]`. Decoding is strict: anything
that is not exactly a well-formed message raises `CodecError` and nothing else,
so a caller can drop a peer's garbage with one except clause.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgpack

from knexa.crdt.digest import BucketSummary, Digest
from knexa.crdt.entry import Entry

PROTOCOL = "knexa.ledger/1"
ENTRIES = "entries"
DIGEST = "digest"
BUCKETS = "buckets"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
DEFAULT_BATCH_BYTES = 256 * 1024
_MAX_INT = 2**63 - 1
_ENTRY_FIELDS = 8


class CodecError(ValueError):
    """Bytes that are not a valid ledger message."""


def entry_to_wire(e: Entry) -> list[Any]:
    return [
        e.key, e.wall_ms, e.counter, e.author, e.expires_at_ms, e.deleted, e.payload, e.signature
    ]


def _entry_from_wire(item: Any) -> Entry:
    if not isinstance(item, list) or len(item) != _ENTRY_FIELDS:
        raise CodecError("an entry must be an array of 8 fields")
    key, wall_ms, counter, author, expires_at_ms, deleted, payload, signature = item
    if not (
        isinstance(key, str)
        and _is_uint(wall_ms)
        and _is_uint(counter)
        and isinstance(author, str)
        and _is_uint(expires_at_ms)
        and type(deleted) is bool
        and isinstance(payload, bytes)
        and isinstance(signature, bytes)
    ):
        raise CodecError("entry fields have the wrong types")
    return Entry(key, payload, wall_ms, counter, author, expires_at_ms, deleted, signature)


def _is_uint(value: Any) -> bool:
    return type(value) is int and 0 <= value <= _MAX_INT


def _pack(message_type: str, body: Any) -> bytes:
    return msgpack.packb([PROTOCOL, message_type, body], use_bin_type=True)


def _unpack(data: bytes, expected_type: str, max_bytes: int) -> Any:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CodecError("a message must be bytes")
    if len(data) > max_bytes:
        raise CodecError(f"message of {len(data)} bytes exceeds {max_bytes}")
    try:
        message = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack signals garbage with many unrelated types
        raise CodecError(f"not msgpack: {type(exc).__name__}") from None
    if not isinstance(message, list) or len(message) != 3 or message[0] != PROTOCOL:
        raise CodecError("not a knexa ledger message")
    if message[1] != expected_type:
        raise CodecError(f"expected a {expected_type} message, got {message[1]!r:.40}")
    return message[2]


def encode_entries(entries: Iterable[Entry]) -> bytes:
    return _pack(ENTRIES, [entry_to_wire(e) for e in entries])


def decode_entries(data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> list[Entry]:
    body = _unpack(data, ENTRIES, max_bytes)
    if not isinstance(body, list):
        raise CodecError("entries body must be an array")
    return [_entry_from_wire(item) for item in body]


def encode_digest(digest: Digest) -> bytes:
    buckets = None if digest.buckets is None else sorted(digest.buckets)
    versions = [[k, *v] for k, v in digest.versions.items()]
    return _pack(DIGEST, [digest.num_buckets, buckets, versions])


def decode_digest(data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> Digest:
    body = _unpack(data, DIGEST, max_bytes)
    if not isinstance(body, list) or len(body) != 3:
        raise CodecError("digest body must be [num_buckets, buckets, versions]")
    num_buckets, buckets, versions = body
    if type(num_buckets) is not int or not 1 <= num_buckets <= 1 << 20:
        raise CodecError("bad bucket count")
    if buckets is not None and not (
        isinstance(buckets, list)
        and all(type(b) is int and 0 <= b < num_buckets for b in buckets)
    ):
        raise CodecError("bad bucket list")
    if not isinstance(versions, list):
        raise CodecError("versions must be an array")
    parsed: dict[str, tuple[int, int, str, bytes]] = {}
    for item in versions:
        if not (
            isinstance(item, list)
            and len(item) == 5
            and isinstance(item[0], str)
            and _is_uint(item[1])
            and _is_uint(item[2])
            and isinstance(item[3], str)
            and isinstance(item[4], bytes)
        ):
            raise CodecError("bad digest version")
        parsed[item[0]] = (item[1], item[2], item[3], item[4])
    return Digest(parsed, None if buckets is None else frozenset(buckets), num_buckets)


def encode_bucket_summary(summary: BucketSummary) -> bytes:
    return _pack(BUCKETS, list(summary.hashes))


def decode_bucket_summary(data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> BucketSummary:
    body = _unpack(data, BUCKETS, max_bytes)
    if not (
        isinstance(body, list)
        and 1 <= len(body) <= 1 << 20
        and all(isinstance(h, bytes) and len(h) == 16 for h in body)
    ):
        raise CodecError("bucket summary must be an array of 16-byte hashes")
    return BucketSummary(tuple(body))


def encode_entry_batches(
    entries: Iterable[Entry], max_bytes: int = DEFAULT_BATCH_BYTES
) -> list[bytes]:
    """Encode `entries` as messages of at most `max_bytes` each, in order.

    GossipSub silently drops messages over 1 MiB, so a delta must be split
    before it is published. Each entry is packed once; the batch is assembled
    from the packed pieces so its size is known exactly.
    """
    header = msgpack.packb(PROTOCOL, use_bin_type=True) + msgpack.packb(ENTRIES)
    # fixarray(3) + header + array32 header: an upper bound on the framing
    overhead = 1 + len(header) + 5
    batches: list[bytes] = []
    pieces: list[bytes] = []
    size = overhead
    for entry in entries:
        piece = msgpack.packb(entry_to_wire(entry), use_bin_type=True)
        if overhead + len(piece) > max_bytes:
            raise ValueError(f"entry {entry.key!r} alone exceeds the batch limit {max_bytes}")
        if size + len(piece) > max_bytes:
            batches.append(_assemble(header, pieces))
            pieces, size = [], overhead
        pieces.append(piece)
        size += len(piece)
    if pieces:
        batches.append(_assemble(header, pieces))
    return batches


def _assemble(header: bytes, pieces: list[bytes]) -> bytes:
    packer = msgpack.Packer()
    return b"\x93" + header + packer.pack_array_header(len(pieces)) + b"".join(pieces)
