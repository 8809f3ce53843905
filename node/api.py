"""The local HTTP API: an ASGI app served by Hypercorn on the daemon's trio loop."""

from __future__ import annotations

import secrets
import time
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel

from knexa.dht import DhtKeyError, DiscoveryError
from knexa.net.version import KNEXA_VERSION
from knexa.node.api_params import peer_id_param
from knexa.node.body_limit import BodyLimit
from knexa.node.collab.api import add_collab_routes
from knexa.node.kvshare.api import add_kv_routes
from knexa.node.learn.api import add_learn_routes
from knexa.node.ledger_api import add_ledger_routes
from knexa.node.nat_api import add_nat_routes
from knexa.node.openai_api import add_adapter_routes, add_openai_routes

if TYPE_CHECKING:
    from knexa.node.daemon import Daemon


class Health(BaseModel):
    status: str
    peer_id: str


class LedgerStats(BaseModel):
    entries: int
    accepted: int
    superseded: int
    rejected: dict[str, int]
    syncs_ok: int
    syncs_failed: int
    published_batches: int


class NodeInfo(BaseModel):
    peer_id: str
    version: str
    agent: str
    listen_addrs: list[str]
    observed_addrs: list[str]
    api: str
    uptime_s: float
    started_at: float
    peers_connected: int
    bootstrap: list[str]
    bytes_in: int
    bytes_out: int
    streams_open: int
    ledger: LedgerStats | None = None
    engine: dict[str, Any] | None = None
    dht: dict[str, Any] | None = None
    collab: dict[str, Any] | None = None
    nat: dict[str, Any] | None = None
    learn: dict[str, Any] | None = None


class ProfileSummary(BaseModel):
    models: list[str]
    device: str
    queue_length: int
    tokens_per_s: float
    reachability: str


class Peer(BaseModel):
    peer_id: str
    address: str
    kind: str
    direction: str
    connected_at: float
    rtt_ms: float | None
    agent: str | None
    profile: ProfileSummary | None = None


class KnownPeer(BaseModel):
    peer_id: str
    profile: ProfileSummary
    updated_at: float  # when the peer last wrote its profile (its clock, seconds since the epoch)


class Peers(BaseModel):
    peers: list[Peer]
    known: list[KnownPeer] = []  # live ledger profiles of peers this node is not connected to


class LedgerEntry(BaseModel):
    key: str
    kind: str
    author: str
    clock: dict[str, int]
    expires_at_ms: int
    deleted: bool
    verified: bool
    value: Any = None


class LedgerListing(BaseModel):
    entries: list[LedgerEntry]
    stats: LedgerStats


_bearer = HTTPBearer(auto_error=False)


def create_app(daemon: Daemon) -> FastAPI:
    app = FastAPI(
        title="knexa-node local API",
        version=KNEXA_VERSION,
        description="Control and inspect the local knexa-node daemon. "
        "Every endpoint but /v1/health needs `Authorization: Bearer <token>`; "
        "the token is in the file `api.token` of the node's data directory.",
    )

    def require_token(
        credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
    ) -> None:
        if credentials is None or not secrets.compare_digest(
            credentials.credentials.encode(), daemon.api_token.encode()
        ):
            raise HTTPException(
                status_code=401,
                detail="missing or wrong API token",
                headers={"WWW-Authenticate": "Bearer"},
            )

    authed = [Depends(require_token)]

    @app.get("/v1/health", response_model=Health)
    async def health() -> Any:
        return {"status": "ok", "peer_id": daemon.peer_id}

    @app.get("/v1/node", response_model=NodeInfo, dependencies=authed)
    async def node() -> Any:
        return daemon.node_info()

    @app.get("/v1/peers", response_model=Peers, dependencies=authed)
    async def peers() -> Any:
        return {"peers": daemon.peers_view(), "known": daemon.known_peers_view()}

    @app.get("/v1/ledger", response_model=LedgerListing, dependencies=authed)
    async def ledger(peer: str | None = None) -> Any:
        """Ledger entries (all verified on merge), optionally only those authored by `peer`."""
        if peer is not None:
            peer_id_param(peer)  # a shortened id from a table would otherwise match nothing, silently
        return daemon.ledger_view(peer)

    @app.get("/v1/find/model/{name_or_hash}", dependencies=authed)
    async def find_model(name_or_hash: str, limit: int = 20) -> Any:
        """Peers that announced serving this model (by name or weights hash) in the DHT."""
        started = time.perf_counter()
        try:
            providers = await daemon.discovery.find_model(name_or_hash, limit=min(max(limit, 1), 100), timeout=10)
        except DhtKeyError as exc:
            raise HTTPException(400, str(exc)) from None
        except DiscoveryError as exc:
            raise HTTPException(502, f"lookup failed: {exc}") from None
        return {"providers": providers, "ms": round((time.perf_counter() - started) * 1000, 1)}

    @app.get("/v1/find/peer/{peer_id}", dependencies=authed)
    async def find_peer(peer_id: str) -> Any:
        """A peer's addresses, resolved through the DHT."""
        peer_id_param(peer_id)
        started = time.perf_counter()
        try:
            found = await daemon.discovery.find_peer(peer_id, timeout=10)
        except DiscoveryError as exc:
            raise HTTPException(502, f"lookup failed: {exc}") from None
        if found is None:
            raise HTTPException(404, f"peer {peer_id} was not found in the DHT")
        return {**found, "ms": round((time.perf_counter() - started) * 1000, 1)}

    @app.get("/v1/engine", dependencies=authed)
    async def engine() -> Any:
        """The local engine's full status (state, model identity, queue, throughput)."""
        if daemon.inference is None:
            return {"state": "disabled", "reason": "started with model = none"}
        return daemon.inference.status()

    router = APIRouter(dependencies=authed)
    add_openai_routes(router, daemon)
    add_adapter_routes(router, daemon)
    add_collab_routes(router, daemon)
    add_kv_routes(router, daemon)
    add_nat_routes(router, daemon)
    add_learn_routes(router, daemon)
    add_ledger_routes(router, daemon)
    app.include_router(router)
    app.add_middleware(BodyLimit)

    @app.get("/metrics", response_class=PlainTextResponse, dependencies=authed)
    async def metrics(request: Request) -> Any:
        return PlainTextResponse(
            daemon.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    return app
