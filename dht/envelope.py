"""Signed record envelopes: msgpack of {value, owner, expires_at, seq, signature}.

Pure code, no I/O. The signature covers the DHT key as well as every other field,
so a record cannot be replayed under another key. The owner is a peer id with an
embedded Ed25519 key, so anyone can verify a record from the record alone.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import msgpack
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID as PeerID

from knexa.dht.keys import DhtKeyError, parse_record_key
from knexa.net.identity import IdentityError, public_key_from_peer_id

DOMAIN = "knexa-record-v1"
MAX_VALUE_SIZE = 64 * 1024
MAX_ENVELOPE_SIZE = MAX_VALUE_SIZE + 1024
MAX_TTL = 7 * 24 * 3600.0
CLOCK_SKEW = 300.0
_FIELDS = frozenset({"value", "owner", "expires_at", "seq", "signature"})
_MAX_SEQ = 2**63 - 1


class RecordError(ValueError):
    """A record envelope is malformed, forged, expired or under the wrong key."""


@dataclass(frozen=True)
class SignedRecord:
    value: bytes
    owner: str
    expires_at: float
    seq: int
    signature: bytes

    def encode(self) -> bytes:
        return msgpack.packb(
            {
                "value": self.value,
                "owner": self.owner,
                "expires_at": self.expires_at,
                "seq": self.seq,
                "signature": self.signature,
            },
            use_bin_type=True,
        )


def _signing_payload(key: str, value: bytes, owner: str, expires_at: float, seq: int) -> bytes:
    return msgpack.packb([DOMAIN, key, value, owner, expires_at, seq], use_bin_type=True)


def sign_record(
    key_pair: KeyPair,
    key: str,
    value: bytes,
    *,
    seq: int,
    ttl: float,
    now: float | None = None,
) -> SignedRecord:
    """A record for `key` signed by `key_pair`, which must own the key."""
    owner_id, _name = parse_record_key(key)
    signer = PeerID.from_pubkey(key_pair.public_key)
    if signer != owner_id:
        raise RecordError(f"key {key} belongs to {owner_id}, not to the signer {signer}")
    if not isinstance(value, bytes) or len(value) > MAX_VALUE_SIZE:
        raise RecordError(f"value must be bytes of at most {MAX_VALUE_SIZE} bytes")
    if not 0 < ttl <= MAX_TTL:
        raise RecordError(f"ttl must be in (0, {MAX_TTL}] seconds")
    if not 0 <= seq <= _MAX_SEQ:
        raise RecordError("seq out of range")
    expires_at = float((time.time() if now is None else now) + ttl)
    owner = owner_id.to_base58()
    signature = key_pair.private_key.sign(_signing_payload(key, value, owner, expires_at, seq))
    return SignedRecord(value, owner, expires_at, seq, signature)


def decode_record(raw: bytes) -> SignedRecord:
    """Parse envelope bytes (no signature check); RecordError when malformed."""
    if not isinstance(raw, bytes | bytearray) or len(raw) > MAX_ENVELOPE_SIZE:
        raise RecordError("record envelope missing or too large")
    try:
        obj = msgpack.unpackb(bytes(raw), raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:
        raise RecordError(f"record envelope is not valid msgpack: {type(exc).__name__}") from None
    if not isinstance(obj, dict) or set(obj) != _FIELDS:
        raise RecordError("record envelope must be a map of exactly " + ", ".join(sorted(_FIELDS)))
    value, owner = obj["value"], obj["owner"]
    expires_at, seq, signature = obj["expires_at"], obj["seq"], obj["signature"]
    if not isinstance(value, bytes) or len(value) > MAX_VALUE_SIZE:
        raise RecordError("record value must be bytes")
    if not isinstance(owner, str):
        raise RecordError("record owner must be a peer id string")
    if isinstance(expires_at, bool) or not isinstance(expires_at, int | float):
        raise RecordError("record expires_at must be a number")
    if not math.isfinite(expires_at):
        raise RecordError("record expires_at must be finite")
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= _MAX_SEQ:
        raise RecordError("record seq must be a non-negative integer")
    if not isinstance(signature, bytes):
        raise RecordError("record signature must be bytes")
    return SignedRecord(value, owner, float(expires_at), seq, signature)


def verify_record(key: str, raw: bytes, *, now: float | None = None) -> SignedRecord:
    """The record in `raw` if it is well formed, unexpired and signed by `key`'s owner."""
    try:
        owner_id, _name = parse_record_key(key)
    except DhtKeyError as exc:
        raise RecordError(str(exc)) from None
    rec = decode_record(raw)
    if rec.owner != owner_id.to_base58():
        raise RecordError(f"record owner {rec.owner} does not own key {key}")
    t = time.time() if now is None else now
    if rec.expires_at <= t:
        raise RecordError(f"record for {key} expired at {rec.expires_at:.0f}")
    if rec.expires_at > t + MAX_TTL + CLOCK_SKEW:
        raise RecordError(f"record for {key} expires too far in the future")
    try:
        pub = public_key_from_peer_id(owner_id)
    except IdentityError as exc:
        raise RecordError(str(exc)) from None
    payload = _signing_payload(key, rec.value, rec.owner, rec.expires_at, rec.seq)
    if not pub.verify(payload, rec.signature):
        raise RecordError(f"bad signature on record for {key}")
    return rec


def select_best(key: str, values: list[bytes], *, now: float | None = None) -> int:
    """Index of the best valid value: highest seq, then latest expiry, then first seen.

    Invalid values never win; RecordError if none is valid.
    """
    best: tuple[int, float] | None = None
    best_idx = -1
    for i, raw in enumerate(values):
        try:
            rec = verify_record(key, raw, now=now)
        except RecordError:
            continue
        rank = (rec.seq, rec.expires_at)
        if best is None or rank > best:
            best, best_idx = rank, i
    if best_idx < 0:
        raise RecordError(f"no valid record among {len(values)} for {key}")
    return best_idx
