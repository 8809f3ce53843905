"""Building and parsing DHT keys: signed-record keys and provider content keys.

Pure code, no I/O.

* Record keys are strings ``/knexa/<name>/<owner peer id>``: the owner is the only
  peer whose signature makes a value under that key valid.
* Content keys (for provider records) are sha2-256 multihashes of a
  domain-separated description of the content, so they stay short (34 bytes,
  under py-libp2p's 80-byte ADD_PROVIDER limit) whatever the content is.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Sequence

from libp2p.peer.id import ID as PeerID

from knexa.net import identity

RECORD_NAMESPACE = "knexa"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_MULTIHASH_SHA256 = b"\x12\x20"
_MAX_TOKEN_ID = 2**32 - 1


class DhtKeyError(ValueError):
    """A record name, peer id or content description cannot be made into a key."""


def _peer_id(owner: PeerID | str) -> PeerID:
    if isinstance(owner, PeerID):
        return owner
    try:
        return identity.parse_peer_id(owner)
    except identity.PeerIdError:
        raise DhtKeyError(f"invalid peer id {owner!r}") from None


def parse_peer_id(text: PeerID | str) -> PeerID:
    """A peer id from its base58 text (or the id itself); DhtKeyError when malformed."""
    return _peer_id(text)


def check_record_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise DhtKeyError(
            f"invalid record name {name!r}: use 1-64 chars of a-z 0-9 . _ - starting with a letter or digit"
        )
    return name


def record_key(owner: PeerID | str, name: str) -> str:
    """The DHT key of `owner`'s record called `name`, e.g. ``/knexa/peer/12D3Koo...``."""
    check_record_name(name)
    return f"/{RECORD_NAMESPACE}/{name}/{_peer_id(owner).to_base58()}"


def parse_record_key(key: str) -> tuple[PeerID, str]:
    """(owner, name) of a record key; DhtKeyError when `key` is not one."""
    parts = key.split("/") if isinstance(key, str) else []
    if len(parts) != 4 or parts[0] != "" or parts[1] != RECORD_NAMESPACE:
        raise DhtKeyError(f"not a knexa record key: {key!r}")
    name, owner = parts[2], parts[3]
    check_record_name(name)
    return _peer_id(owner), name


def content_key(kind: str, data: bytes) -> bytes:
    """Provider key for content of type `kind` described by `data` (a multihash)."""
    if not kind or "\0" in kind:
        raise DhtKeyError(f"invalid content kind {kind!r}")
    digest = hashlib.sha256(b"knexa/" + kind.encode() + b"\0" + data).digest()
    return _MULTIHASH_SHA256 + digest


def _text(value: str, what: str) -> bytes:
    if not isinstance(value, str) or not value.strip():
        raise DhtKeyError(f"{what} must be a non-empty string, got {value!r}")
    return value.strip().encode()


def model_key(name_or_hash: str) -> bytes:
    """Provider key of a model, by its weights hash or by its name (announce both)."""
    return content_key("model", _text(name_or_hash, "model name or hash"))


def adapter_key(adapter_id: str) -> bytes:
    """Provider key of a LoRA/PEFT adapter."""
    return content_key("adapter", _text(adapter_id, "adapter id"))


def prefix_key(model_hash: str, token_ids: Sequence[int]) -> bytes:
    """Provider key of a KV-cache prefix: the model's hash plus the prompt's token ids."""
    head = _text(model_hash, "model hash")
    try:
        ids = [int(t) for t in token_ids]
    except (TypeError, ValueError):
        raise DhtKeyError("token ids must be integers") from None
    if not ids:
        raise DhtKeyError("a prefix needs at least one token id")
    if any(t < 0 or t > _MAX_TOKEN_ID for t in ids):
        raise DhtKeyError("token ids must be in 0..2**32-1")
    body = struct.pack(f"<{len(ids)}I", *ids)
    return content_key("prefix", head + b"\0" + body)
