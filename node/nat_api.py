"""API routes for NAT traversal: connect to an address (through a relay if it is a circuit
address) and time the signed-RPC path to a peer."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field

from knexa.net.host import AddressError, parse_multiaddr
from knexa.net.nat.echo import MAX_ECHO_BYTES, measure_echo
from knexa.net.nat.policy import is_circuit
from knexa.net.rpc import RpcError
from knexa.node.api_params import peer_id_param

if TYPE_CHECKING:
    from knexa.node.daemon import Daemon


class ConnectRequest(BaseModel):
    addr: str


class EchoRequest(BaseModel):
    peer: str
    size: int = Field(default=1024, ge=1, le=MAX_ECHO_BYTES)
    count: int = Field(default=10, ge=1, le=10_000)


def add_nat_routes(router: APIRouter, daemon: Daemon) -> None:
    @router.post("/v1/connect")
    async def connect(request: ConnectRequest) -> Any:
        """Connect to a /p2p multiaddr; a /p2p-circuit address is dialed through its relay."""
        try:
            addr = parse_multiaddr(request.addr, need_peer_id=True)
        except AddressError as exc:
            raise HTTPException(400, str(exc)) from None
        started = time.perf_counter()
        text = str(addr)
        peer_text = text.rsplit("/p2p/", 1)[1]
        peer = peer_id_param(peer_text)
        # For a peer it holds a connection to, py-libp2p dials nothing, whatever the address: say so, rather
        # than report a connection over an address that was never tried (a circuit is dialled regardless).
        already = not is_circuit(text) and bool(daemon.host.get_network().get_connections(peer))
        try:
            if is_circuit(text):
                await daemon.nat.connect_relayed(peer, [text])
            else:
                await daemon.mesh.connect(addr)
        except ConnectionError as exc:
            raise HTTPException(502, f"cannot connect to {text}: {exc}") from None
        return {"peer_id": peer_text, "via": "relay" if is_circuit(text) else "direct",
                "already_connected": already, "seconds": round(time.perf_counter() - started, 4)}

    @router.post("/v1/diag/echo")
    async def echo(request: EchoRequest) -> Any:
        """Signed `diag.echo` calls to a peer, each reply checked; latency and throughput."""
        peer = peer_id_param(request.peer)
        try:
            result = await measure_echo(daemon.rpc, peer, request.size, request.count)
        except RpcError as exc:
            raise HTTPException(502, f"echo to {request.peer} failed: {exc}") from None
        conns = daemon.host.get_network().get_connections(peer)
        paths = [str(a) for c in conns for a in (c.get_transport_addresses() or [])]
        return {**result, "paths": paths}

