"""Building the node's libp2p host: TCP + Noise + yamux, identify and ping."""

from __future__ import annotations

from collections.abc import Sequence

import multiaddr
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.crypto.keys import KeyPair
from libp2p.identity.identify import identify as _identify
from libp2p.network.config import ConnectionConfig

from knexa.net.traffic import CountingTCP, TrafficCounter
from knexa.net.version import AGENT_VERSION


class AddressError(ValueError):
    """A multiaddr given by the user cannot be parsed or used."""


def parse_multiaddr(text: str, *, need_peer_id: bool = False) -> multiaddr.Multiaddr:
    try:
        addr = multiaddr.Multiaddr(text)
    except Exception as exc:
        raise AddressError(f"invalid multiaddr {text!r}: {exc}") from None
    if need_peer_id and "p2p" not in {p.name for p in addr.protocols()}:
        raise AddressError(f"multiaddr {text!r} lacks the /p2p/<peer id> part")
    return addr


def connection_config() -> ConnectionConfig:
    # One connection per peer makes the swarm cancel its happy-eyeballs race as
    # soon as the first dial succeeds, instead of always waiting 250 ms.
    return ConnectionConfig(max_connections_per_peer=1)


def build_host(
    key_pair: KeyPair,
    listen_addrs: Sequence[multiaddr.Multiaddr],
    traffic: TrafficCounter | None = None,
) -> IHost:
    """A host for `key_pair`; start it with `async with host.run(listen_addrs)`."""
    # py-libp2p reads the agent version it announces in identify from this
    # module global; there is no constructor argument for it.
    _identify.AGENT_VERSION = AGENT_VERSION
    return new_host(
        key_pair=key_pair,
        listen_addrs=list(listen_addrs),
        connection_config=connection_config(),
        enable_mDNS=False,
        enable_upnp=False,
        transports=[CountingTCP(traffic or TrafficCounter())],
    )
