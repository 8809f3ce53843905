"""Signed envelopes: every request, response and streamed item is one.

An envelope is a msgpack array whose signature covers canonical bytes binding
the protocol version, kind, method, call id, sequence number, sender and
recipient peer ids, timestamp, nonce, timeout, status and the SHA-256 of the
body. The body travels as opaque bytes (itself msgpack), so the hash is over
exactly what was sent and the envelope can be stored, forwarded and verified
later by anyone who has it: the sender's Ed25519 key is embedded in its peer id.
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
from collections import OrderedDict
from dataclasses import dataclass
from enum import IntEnum

import msgpack
from libp2p.crypto.ed25519 import Ed25519PublicKey
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID as PeerID

from knexa.net.rpc.errors import CodecError, ErrorCode, RpcError
from knexa.net.rpc.packing import array_header, bin_header, pack
from knexa.net.rpc.schema import PackedBody

VERSION = 1
NONCE_SIZE = 16
SIGNATURE_SIZE = 64
_DOMAIN = b"knexa/rpc/envelope/v1\x00"
_FIXED = struct.Struct(">HBQQqQH")
_FIELDS = 13
_MAX_ID = 128  # bytes; an identity-multihash Ed25519 peer id is 38


class Kind(IntEnum):
    REQUEST = 1
    ITEM = 2
    CLOSE = 3
    RESPONSE = 4
    DETACHED = 5  # a payload signed for storage or forwarding, not part of a call


@dataclass(frozen=True, slots=True)
class Envelope:
    kind: Kind
    method: str
    call_id: int
    seq: int
    sender: bytes
    recipient: bytes  # b"" means "anyone" (detached payloads only)
    ts_ms: int
    nonce: bytes
    timeout_ms: int  # 0: no deadline
    status: int  # ErrorCode; non-zero only on error responses
    body: bytes  # msgpack
    sig: bytes
    body_sha256: bytes  # derived on decode; what the signature binds

    @property
    def sender_id(self) -> PeerID:
        return PeerID(self.sender)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _lp(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def signing_bytes(
    kind: int,
    method: str,
    call_id: int,
    seq: int,
    sender: bytes,
    recipient: bytes,
    ts_ms: int,
    nonce: bytes,
    timeout_ms: int,
    status: int,
    body_sha256: bytes,
) -> bytes:
    """The canonical bytes a signature covers; unambiguous by construction."""
    return b"".join(
        (
            _DOMAIN,
            _FIXED.pack(VERSION, kind, call_id, seq, ts_ms, timeout_ms, status),
            _lp(method.encode()),
            _lp(sender),
            _lp(recipient),
            _lp(nonce),
            body_sha256,
        )
    )


def seal(
    key_pair: KeyPair,
    *,
    kind: Kind,
    method: str,
    call_id: int = 0,
    seq: int = 0,
    sender: bytes,
    recipient: bytes,
    body: bytes | PackedBody,
    timeout_ms: int = 0,
    status: int = 0,
    ts_ms: int | None = None,
    nonce: bytes | None = None,
) -> bytes:
    """Sign and encode an envelope; `sender` must be the peer id of `key_pair`."""
    ts = now_ms() if ts_ms is None else ts_ms
    nonce = os.urandom(NONCE_SIZE) if nonce is None else nonce
    # A body that carries its own digest (see schema.PackedBody) is hashed once by
    # its producer; receivers always recompute it.
    digest = getattr(body, "sha256", None)
    body = getattr(body, "data", body)
    if digest is None:
        digest = hashlib.sha256(body).digest()
    msg = signing_bytes(
        kind, method, call_id, seq, sender, recipient, ts, nonce, timeout_ms, status, digest
    )
    sig = key_pair.private_key.sign(msg)
    head = [VERSION, int(kind), method, call_id, seq, sender, recipient, ts, nonce, timeout_ms,
            status]
    # Built by hand so a large body is copied once, not grown into msgpack's buffer.
    return b"".join(
        [array_header(_FIELDS), *map(pack, head), bin_header(len(body)), body, pack(sig)]
    )


def _int(v: object, lo: int, hi: int, what: str) -> int:
    if type(v) is not int or not lo <= v < hi:
        raise CodecError(f"envelope {what} out of range")
    return v


def _bytes(v: object, lo: int, hi: int, what: str) -> bytes:
    if not isinstance(v, bytes) or not lo <= len(v) <= hi:
        raise CodecError(f"envelope {what} must be {lo}..{hi} bytes")
    return v


def decode_envelope(data: bytes) -> Envelope:
    """Parse (not verify) an envelope; raises `CodecError` on any malformation."""
    try:
        f = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True)
    except Exception as exc:
        raise CodecError(f"envelope is not valid msgpack: {type(exc).__name__}") from None
    if not isinstance(f, list) or len(f) != _FIELDS:
        raise CodecError(f"envelope must be an array of {_FIELDS} fields")
    if f[0] != VERSION or type(f[0]) is not int:
        raise CodecError(f"unsupported envelope version {f[0]!r}")
    try:
        kind = Kind(f[1]) if type(f[1]) is int else None
    except ValueError:
        kind = None
    if kind is None:
        raise CodecError(f"unknown envelope kind {f[1]!r}")
    if not isinstance(f[2], str) or len(f[2]) > 256:
        raise CodecError("envelope method must be a string of at most 256 characters")
    return Envelope(
        kind=kind,
        method=f[2],
        call_id=_int(f[3], 0, 2**64, "call id"),
        seq=_int(f[4], 0, 2**64, "seq"),
        sender=_bytes(f[5], 1, _MAX_ID, "sender"),
        recipient=_bytes(f[6], 0, _MAX_ID, "recipient"),
        ts_ms=_int(f[7], -(2**63), 2**63, "timestamp"),
        nonce=_bytes(f[8], NONCE_SIZE, NONCE_SIZE, "nonce"),
        timeout_ms=_int(f[9], 0, 2**64, "timeout"),
        status=_int(f[10], 0, 2**16, "status"),
        body=_bytes(f[11], 0, 2**32, "body"),
        sig=_bytes(f[12], SIGNATURE_SIZE, SIGNATURE_SIZE, "signature"),
        body_sha256=hashlib.sha256(f[11]).digest(),
    )


class KeyCache:
    """Ed25519 public keys parsed from peer ids, bounded LRU."""

    def __init__(self, size: int = 1024) -> None:
        self._size = size
        self._keys: OrderedDict[bytes, Ed25519PublicKey] = OrderedDict()

    def get(self, peer_id: bytes) -> Ed25519PublicKey:
        key = self._keys.get(peer_id)
        if key is not None:
            self._keys.move_to_end(peer_id)
            return key
        try:
            pub = PeerID(peer_id).extract_public_key()
        except Exception:
            pub = None
        if not isinstance(pub, Ed25519PublicKey):
            raise RpcError(ErrorCode.UNAUTHORIZED, "sender peer id does not embed an Ed25519 key")
        self._keys[peer_id] = pub
        if len(self._keys) > self._size:
            self._keys.popitem(last=False)
        return pub


_DEFAULT_KEYS = KeyCache()


def verify_signature(env: Envelope, keys: KeyCache | None = None) -> None:
    """Check `env.sig` against the key embedded in `env.sender`; raises UNAUTHORIZED."""
    pub = (keys or _DEFAULT_KEYS).get(env.sender)
    msg = signing_bytes(
        env.kind, env.method, env.call_id, env.seq, env.sender, env.recipient, env.ts_ms,
        env.nonce, env.timeout_ms, env.status, env.body_sha256,
    )
    try:
        ok = pub.verify(msg, env.sig)
    except Exception:
        ok = False
    if not ok:
        raise RpcError(ErrorCode.UNAUTHORIZED, "bad signature")


def sign_payload(
    key_pair: KeyPair, topic: str, body: bytes, *, recipient: PeerID | None = None
) -> bytes:
    """A detached signed payload (e.g. a reputation report) for storage or forwarding."""
    return seal(
        key_pair,
        kind=Kind.DETACHED,
        method=topic,
        sender=PeerID.from_pubkey(key_pair.public_key).to_bytes(),
        recipient=recipient.to_bytes() if recipient is not None else b"",
        body=body,
    )


def verify_detached(
    data: bytes,
    *,
    topic: str | None = None,
    sender: PeerID | None = None,
    recipient: PeerID | None = None,
    max_age_s: float | None = None,
    now: float | None = None,
) -> Envelope:
    """Verify a payload made by `sign_payload` (or any envelope); returns it if genuine.

    Raises `RpcError(UNAUTHORIZED)` for a bad signature or a mismatch of the
    given expectations, `RpcError(BAD_REQUEST)` if the bytes do not parse.
    """
    try:
        env = decode_envelope(data)
    except CodecError as exc:
        raise RpcError(ErrorCode.BAD_REQUEST, str(exc)) from None
    verify_signature(env)
    if topic is not None and env.method != topic:
        raise RpcError(ErrorCode.UNAUTHORIZED, f"payload topic {env.method!r} != {topic!r}")
    if sender is not None and env.sender != sender.to_bytes():
        raise RpcError(ErrorCode.UNAUTHORIZED, "payload signed by another peer")
    if recipient is not None and env.recipient not in (b"", recipient.to_bytes()):
        raise RpcError(ErrorCode.UNAUTHORIZED, "payload addressed to another peer")
    if max_age_s is not None:
        current = (time.time() if now is None else now) * 1000
        if not -max_age_s * 1000 <= current - env.ts_ms <= max_age_s * 1000:
            raise RpcError(ErrorCode.UNAUTHORIZED, "payload timestamp outside the window")
    return env
