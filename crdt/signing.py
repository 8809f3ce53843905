"""Signing entries with a node key and verifying them from the author's peer id alone.

Verification uses PyNaCl's VerifyKey directly, cached per author: parsing a
peer id and building a key object costs more than the signature check itself.
Signature checks dominate merge time, and libsodium runs without the GIL, so
large batches are checked on a few threads (pure computation, no I/O).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID as PeerID
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from knexa.crdt.entry import Entry, signing_bytes
from knexa.crdt.hlc import Timestamp
from knexa.net.identity import peer_id_of, public_key_from_peer_id

SIGNATURE_BYTES = 64
# Below this many signatures a batch is checked inline: thread hand-off would cost more.
PARALLEL_MIN_BATCH = 256
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _shared_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(DEFAULT_WORKERS, thread_name_prefix="ledger-verify")
        return _pool


class AuthorKeyError(ValueError):
    """The author field is not a peer id with an embedded Ed25519 key."""


class Signer:
    """Builds entries signed by one node key."""

    def __init__(self, key_pair: KeyPair) -> None:
        self._private_key = key_pair.private_key
        self.author = peer_id_of(key_pair).to_base58()

    def sign(
        self,
        key: str,
        payload: bytes,
        timestamp: Timestamp,
        expires_at_ms: int,
        deleted: bool = False,
    ) -> Entry:
        message = signing_bytes(
            key, payload, timestamp.wall_ms, timestamp.counter, self.author, expires_at_ms, deleted
        )
        return Entry(
            key=key,
            payload=payload,
            wall_ms=timestamp.wall_ms,
            counter=timestamp.counter,
            author=self.author,
            expires_at_ms=expires_at_ms,
            deleted=deleted,
            signature=self._private_key.sign(message),
        )


class Verifier:
    """Checks entry signatures against the key embedded in the author's peer id."""

    def __init__(self, max_cached_authors: int = 16384, workers: int = DEFAULT_WORKERS) -> None:
        # Bounded so a flood of made-up authors cannot grow memory without limit.
        self._keys: OrderedDict[str, VerifyKey] = OrderedDict()
        self._max_cached = max_cached_authors
        self._workers = workers

    def author_key(self, author: str) -> VerifyKey:
        key = self._keys.get(author)
        if key is not None:
            return key
        try:
            public_key = public_key_from_peer_id(PeerID.from_base58(author))
            key = VerifyKey(public_key.to_bytes())
        except Exception as exc:  # any parse failure means "not a valid author"
            raise AuthorKeyError(f"author {author[:64]!r} is not an Ed25519 peer id") from exc
        self._keys[author] = key
        if len(self._keys) > self._max_cached:
            self._keys.popitem(last=False)
        return key

    def is_authentic(self, entry: Entry) -> bool:
        """True if the signature is the author's over the entry's canonical bytes."""
        return _signature_ok(self.author_key(entry.author), entry)

    def are_authentic(self, entries: Sequence[Entry]) -> list[bool]:
        """`is_authentic` for each entry; every author must already parse (`author_key`)."""
        keys = [self.author_key(e.author) for e in entries]
        if self._workers <= 1 or len(entries) < PARALLEL_MIN_BATCH:
            return [_signature_ok(k, e) for k, e in zip(keys, entries, strict=True)]
        # One contiguous chunk per worker keeps the hand-off cost to a few tasks.
        step = -(-len(entries) // self._workers)
        chunks = [(keys[i : i + step], entries[i : i + step]) for i in range(0, len(entries), step)]
        results = _shared_pool().map(_check_chunk, chunks)
        return [ok for chunk in results for ok in chunk]


def _check_chunk(chunk: tuple[list[VerifyKey], Sequence[Entry]]) -> list[bool]:
    keys, entries = chunk
    return [_signature_ok(k, e) for k, e in zip(keys, entries, strict=True)]


def _signature_ok(key: VerifyKey, entry: Entry) -> bool:
    if len(entry.signature) != SIGNATURE_BYTES:
        return False
    try:
        key.verify(entry.signed_bytes, entry.signature)
    except BadSignatureError:
        return False
    return True
