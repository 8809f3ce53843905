"""Local API routes of KV collaboration: POST /v1/kv/ask and GET /v1/kv (torch is imported only on use)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field

from knexa.node.inference_wire import MAX_NEW_TOKENS

if TYPE_CHECKING:
    from knexa.node.daemon import Daemon


class KvAsk(BaseModel):
    query: str = Field(min_length=1, max_length=32_000)
    max_tokens: int = Field(128, ge=1, le=MAX_NEW_TOKENS)
    private: bool = Field(False, description="rephrase first; only the rephrased text leaves the node")


def peer_models(daemon: Daemon) -> list[Any]:
    """Peers with a model in their live ledger profile (this node excluded)."""
    from knexa.node.kvshare.ask import PeerModel

    out = []
    profiles = daemon.ledger.profiles() if daemon.ledger is not None else {}
    for peer_id, profile in sorted(profiles.items()):
        if peer_id != daemon.peer_id and profile.models:
            model = profile.models[0]
            out.append(PeerModel(peer_id, model.name, model.weights_hash))
    return out


def add_kv_routes(router: APIRouter, daemon: Daemon) -> None:
    @router.post("/v1/kv/ask")
    async def kv_ask_route(request: KvAsk) -> Any:
        """Answer with this node's model over the best KV path: prefix hit, fused, text hint or local."""
        if daemon.kvshare is None or daemon.kvexchange is None:
            raise HTTPException(503, "this node runs no model")
        from knexa.node.engine import EngineError, SamplingParams
        from knexa.node.kvshare.ask import kv_ask

        try:
            answer = await kv_ask(
                daemon.kvshare, daemon.kvexchange, request.query, SamplingParams(max_new_tokens=request.max_tokens),
                peer_models(daemon), private=request.private,
            )
        except EngineError as exc:
            status = 400 if exc.code in ("invalid_request", "context_length_exceeded", "invalid_messages") else 503
            raise HTTPException(status, f"{exc.code}: {exc}") from None
        return answer.to_dict()

    @router.get("/v1/kv")
    async def kv_status() -> Any:
        """The prefix store, paths taken, caches served and refused, measured rates."""
        if daemon.kvshare is None:
            return {"state": "disabled"}
        return daemon.kvshare.stats()
