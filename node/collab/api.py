"""Local API routes of the collaboration protocols: POST /v1/collab/ask and GET /v1/collab."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field

from knexa.node.collab.service import CollabError
from knexa.node.collab.wire import MAX_REQUIREMENT
from knexa.node.inference_wire import MAX_NEW_TOKENS, GenerateParams, Message

if TYPE_CHECKING:
    from knexa.node.daemon import Daemon


class CollabAsk(BaseModel):
    mode: Literal["moa", "vote"] = "moa"
    messages: list[Message] = Field(min_length=1, max_length=64)
    k: int = Field(2, ge=1, le=16, description="moa: peers asked per layer")
    m: int = Field(1, ge=1, le=8, description="moa: proposer layers")
    executors: int = Field(3, ge=1, le=16, description="vote: nodes that execute")
    requirement: dict[str, float] = Field(default_factory=dict, max_length=MAX_REQUIREMENT)
    max_tokens: int = Field(256, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(0.0, ge=0, le=2)
    seed: int | None = None
    deadline_s: float | None = Field(None, gt=0, le=600, description="per layer")


_STATUS = {"overloaded": 429, "no_peers": 503, "no_answers": 504, "bad_request": 400, "unavailable": 503}


def add_collab_routes(router: APIRouter, daemon: Daemon) -> None:
    @router.post("/v1/collab/ask")
    async def collab_ask(request: CollabAsk) -> Any:
        """One collaborative answer: mixture of agents (`k` peers, `m` layers) or a weighted vote."""
        service = daemon.collab
        messages = [m.model_dump() for m in request.messages]
        params = GenerateParams(temperature=request.temperature, seed=request.seed, max_new_tokens=request.max_tokens)
        try:
            if request.mode == "moa":
                return await service.ask_moa(messages, request.k, request.m, params, request.deadline_s)
            return await service.ask_vote(
                messages, request.requirement, request.executors, params, request.deadline_s
            )
        except CollabError as exc:
            headers = {}
            if exc.retry_after_s is not None:
                headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
            detail = f"{exc.code}: {exc}"
            if exc.retry_after_s is not None:
                detail += f" (retry after {exc.retry_after_s:.2f}s)"
            raise HTTPException(_STATUS.get(exc.code, 500), detail, headers=headers) from None

    @router.get("/v1/collab")
    async def collab_status() -> Any:
        """Admission (queue, admitted rate, rejections) and verification counters."""
        return daemon.collab.stats()
