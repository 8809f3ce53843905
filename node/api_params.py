"""Request parameters that the local API's routes check alike."""

from __future__ import annotations

from fastapi import HTTPException
from libp2p.peer.id import ID as PeerID

from knexa.net.identity import PeerIdError, parse_peer_id


def peer_id_param(text: str) -> PeerID:
    """`text` as a peer id, or a 400 saying that it is not one."""
    try:
        return parse_peer_id(text)
    except PeerIdError as exc:
        raise HTTPException(400, str(exc)) from None
