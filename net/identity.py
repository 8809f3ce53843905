"""The node's persistent Ed25519 identity: created once, reused on every start."""

from __future__ import annotations

import os
from pathlib import Path

import multihash
from libp2p.crypto.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID as PeerID

KEY_FILE = "identity.key"
_MAGIC = b"knexa-ed25519-v1\n"
_SEED_LEN = 32


class IdentityError(Exception):
    """The identity key file exists but cannot be used."""


class PeerIdError(ValueError):
    """Text that is not a peer id."""


def _write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that it is never readable by others, even briefly."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def load_or_create_identity(data_dir: Path) -> KeyPair:
    """Return the node key stored in `data_dir`, creating it (mode 0600) on first use."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / KEY_FILE
    if not path.exists():
        key = Ed25519PrivateKey.new()
        _write_private(path, _MAGIC + key.to_bytes()[:_SEED_LEN].hex().encode() + b"\n")
        return KeyPair(key, key.get_public_key())
    return load_identity(path)


def load_identity(path: Path) -> KeyPair:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise IdentityError(f"cannot read identity key file {path}: {exc.strerror}") from None
    if not raw.startswith(_MAGIC):
        raise IdentityError(
            f"identity key file {path} is corrupted (unknown format); "
            "move it away to create a new identity (the peer id will change)"
        )
    try:
        seed = bytes.fromhex(raw[len(_MAGIC) :].decode("ascii").strip())
        if len(seed) != _SEED_LEN:
            raise ValueError("wrong length")
        key = Ed25519PrivateKey.new(seed)
    except (ValueError, UnicodeDecodeError):
        raise IdentityError(
            f"identity key file {path} is corrupted (bad key bytes); "
            "move it away to create a new identity (the peer id will change)"
        ) from None
    return KeyPair(key, key.get_public_key())


def peer_id_of(key_pair: KeyPair) -> PeerID:
    return PeerID.from_pubkey(key_pair.public_key)


def public_key_from_peer_id(peer_id: PeerID) -> Ed25519PublicKey:
    """Extract the Ed25519 key embedded in an identity-multihash peer id."""
    pub = peer_id.extract_public_key()
    if not isinstance(pub, Ed25519PublicKey):
        raise IdentityError(f"peer id {peer_id} does not embed an Ed25519 key")
    return pub


def parse_peer_id(text: str) -> PeerID:
    """A peer id from its base58 text; PeerIdError unless it is a well-formed multihash. Any base58 string
    decodes to some bytes ("garbage" does), so decoding alone accepts ids no peer can have."""
    try:
        peer = PeerID.from_base58(text)
        multihash.decode(peer.to_bytes())
    except Exception:  # base58 and multihash errors come in several types
        raise PeerIdError(f"not a peer id: {text!r}") from None
    return peer
