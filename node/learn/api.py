"""Local API routes of learning together: POST /v1/learn, DELETE /v1/learn, GET /v1/learn,
GET /v1/learn/rounds."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field

from knexa.node.learn.errors import LearnError

if TYPE_CHECKING:
    from knexa.node.daemon import Daemon

_STATUS = {"bad_request": 400, "busy": 409, "not_enrolled": 409, "unavailable": 503}


def _http_error(exc: LearnError) -> HTTPException:
    return HTTPException(_STATUS.get(exc.code, 500), f"{exc.code}: {exc}")


class LearnRequest(BaseModel):
    data: str = Field(min_length=1, max_length=4096, description="a JSONL file of prompt/answer pairs on this host")
    wait: bool = Field(False, description="answer when local training is done (else at once)")


def add_learn_routes(router: APIRouter, daemon: Daemon) -> None:
    def service() -> Any:
        if daemon.learn is None:
            raise HTTPException(503, "unavailable: this node runs no model (started with model = none)")
        return daemon.learn

    @router.post("/v1/learn")
    async def learn(request: LearnRequest) -> Any:
        """Train the node's adapter on private data (it never leaves the node), then join distillation rounds."""
        learn = service()
        path = Path(request.data)
        try:
            if request.wait:
                return await learn.learn(path)
            await learn.start_learning(path)
        except LearnError as exc:
            raise _http_error(exc) from None
        return {**learn.status(), "started": True}

    @router.delete("/v1/learn")
    async def leave_rounds() -> Any:
        """Take part in no more distillation rounds (membership withdrawn at once); the adapter keeps serving."""
        try:
            return service().leave_rounds()
        except LearnError as exc:
            raise _http_error(exc) from None

    @router.get("/v1/learn")
    async def learn_status() -> Any:
        """Phase, accuracy and skills on the node's validation split, members, the round and this node's role."""
        return service().status()

    @router.get("/v1/learn/rounds")
    async def rounds(explain: bool = False) -> Any:
        """Round history (pairs, rewards, gains) from the shared matchmaker state; with explain, the LinUCB
        score (mean + width = upper confidence bound) of every possible pair for the next round."""
        return service().rounds_view(explain)
