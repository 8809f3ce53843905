"""Building the node's libp2p host: TCP + Noise + yamux, identify and ping."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.crypto.keys import KeyPair
from libp2p.identity.identify import identify as _identify
from libp2p.network.auto_connector import AutoConnector
from libp2p.network.config import ConnectionConfig
from libp2p.utils.address_validation import get_available_interfaces

from knexa.net.traffic import CountingTCP, TrafficCounter
from knexa.net.version import AGENT_VERSION


class AddressError(ValueError):
    """A multiaddr given by the user cannot be parsed or used."""


class NetworkStopped(Exception):
    """The host's network service stopped while the node still ran on it."""


def parse_multiaddr(text: str, *, need_peer_id: bool = False) -> multiaddr.Multiaddr:
    try:
        addr = multiaddr.Multiaddr(text)
    except Exception as exc:
        reason = str(exc).split(" (string:")[0].replace(f"Invalid MultiAddr {text!r}: ", "")
        raise AddressError(f"invalid multiaddr {text!r}: {reason}") from None
    if need_peer_id and "p2p" not in {p.name for p in addr.protocols()}:
        raise AddressError(f"multiaddr {text!r} lacks the /p2p/<peer id> part")
    return addr


def connection_config() -> ConnectionConfig:
    # One connection per peer makes the swarm cancel its happy-eyeballs race as
    # soon as the first dial succeeds, instead of always waiting 250 ms.
    return ConnectionConfig(max_connections_per_peer=1)


class _NoAutoConnector(AutoConnector):
    """py-libp2p's auto-connector dials every peer in the peerstore until 150
    connections are open, over and over for peers that are gone. A node of ours
    chooses whom it dials (bootstrap links, DHT lookups, RPC callees), so it stays off."""

    async def start(self) -> None:
        self._started = False

    async def maybe_connect(self) -> None:
        return None


def build_host(
    key_pair: KeyPair,
    listen_addrs: Sequence[multiaddr.Multiaddr],
    traffic: TrafficCounter | None = None,
) -> IHost:
    """A host for `key_pair`; start it with `async with host.run(listen_addrs)`."""
    # py-libp2p reads the agent version it announces in identify from this
    # module global; there is no constructor argument for it.
    _identify.AGENT_VERSION = AGENT_VERSION
    host = new_host(
        key_pair=key_pair,
        listen_addrs=list(listen_addrs),
        connection_config=connection_config(),
        enable_mDNS=False,
        enable_upnp=False,
        transports=[CountingTCP(traffic or TrafficCounter())],
    )
    network = host.get_network()
    network.auto_connector = _NoAutoConnector(network)  # type: ignore[attr-defined]
    return host


async def close_host(host: IHost, timeout_s: float = 2.0) -> None:
    """Close connections and listening sockets before leaving `host.run()`.

    py-libp2p's own teardown runs in the already-cancelled scope: a connection
    gets marked closed before its socket is, every later close() then returns
    early, the socket stays open and the peer never learns we left; the
    listening socket stays open too, so a restart on the same port fails.
    Closing each muxed connection (idempotent down to the socket) and then the
    swarm, shielded and bounded, releases them.
    """
    log = logging.getLogger("knexa.host")
    network = host.get_network()
    with trio.CancelScope(shield=True), trio.move_on_after(timeout_s) as scope:
        async with trio.open_nursery() as nursery:
            for conn in list(network.get_connections()):
                nursery.start_soon(_close_quietly, conn.muxed_conn.close)
        await _close_quietly(network.close)
    if scope.cancelled_caught:
        log.debug("event=close_timeout after_s=%s", timeout_s)


async def watch_network(host: IHost) -> None:
    """Never returns while the host's network service runs; raises NetworkStopped once it stops.

    py-libp2p stops its whole swarm when one of the swarm's tasks fails, and every connection dies with it,
    yet the host goes on accepting calls (each new stream then fails): a node left like that is unreachable
    while it looks alive, so whoever runs the host must learn of it.
    """
    manager = host.get_network().manager
    await manager.wait_finished()
    cause = "after a task of it failed" if manager.did_error else "while the node still used it"
    raise NetworkStopped(f"the libp2p network service stopped {cause}")


async def _close_quietly(close: Callable[[], Awaitable[object]]) -> None:
    try:
        await close()
    except Exception as exc:  # teardown is best effort; the peer may be gone already
        logging.getLogger("knexa.host").debug("event=close_failed reason=%s", exc)


_INTERFACES_TTL_S = 10.0
_interfaces: dict[int, tuple[float, list[multiaddr.Multiaddr]]] = {}


def _interface_addrs(port: int) -> list[multiaddr.Multiaddr]:
    # py-libp2p asks for the host's addresses on every pubsub message it sends
    # (to sign a peer record); enumerating interfaces each time costs more than
    # the message. Interfaces change rarely: a few seconds' staleness is fine.
    now = time.monotonic()
    cached = _interfaces.get(port)
    if cached is None or now - cached[0] > _INTERFACES_TTL_S:
        cached = (now, list(get_available_interfaces(port)))
        _interfaces[port] = cached
    return cached[1]


def dialable_addrs(host: IHost) -> list[multiaddr.Multiaddr]:
    """The host's addresses as others can dial them: wildcards become interface addresses."""
    suffix = f"/p2p/{host.get_id()}"
    result: list[multiaddr.Multiaddr] = []
    for addr in host.get_transport_addrs():
        names = [p.name for p in addr.protocols()]
        ip = addr.value_for_protocol(names[0]) if names and names[0] in ("ip4", "ip6") else None
        if ip in ("0.0.0.0", "::") and "tcp" in names:
            family = 4 if names[0] == "ip4" else 6
            candidates = [
                a for a in _interface_addrs(int(addr.value_for_protocol("tcp")))
                if a.protocols()[0].name == f"ip{family}"
            ]
        else:
            candidates = [addr]
        for candidate in candidates:
            full = multiaddr.Multiaddr(str(candidate) + suffix)
            if full not in result:
                result.append(full)
    return result
