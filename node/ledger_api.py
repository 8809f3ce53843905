"""API routes that write to the ledger or wait on it: an operator's reputation report
about a peer, and waiting until an entry has reached this node (how far a write has
spread, measured where it lands)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import trio
from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field

from knexa.crdt.reputation import MAX_REASON_CHARS
from knexa.node.api_params import peer_id_param
from knexa.node.ledger_view import entry_view

if TYPE_CHECKING:
    from knexa.node.daemon import Daemon

MAX_WAIT_S = 60.0
# The ledger has no change event; a key lookup every 10 ms costs nothing and
# bounds the arrival-time error.
WAIT_POLL_S = 0.01


class ReportRequest(BaseModel):
    subject: str
    score: float = Field(ge=0.0, le=1.0)
    reason: str = Field(default="", max_length=MAX_REASON_CHARS)


def add_ledger_routes(router: APIRouter, daemon: Daemon) -> None:
    @router.post("/v1/ledger/reports")
    async def report(request: ReportRequest) -> Any:
        """Sign a reputation report about a peer (score 0 = caught failing, 1 = good) and spread it."""
        peer_id_param(request.subject)
        if request.subject == daemon.peer_id:
            raise HTTPException(400, "a node does not report about itself")
        return entry_view(daemon.report_peer(request.subject, request.score, request.reason))

    @router.get("/v1/ledger/wait")
    async def wait(key: str, timeout_s: float = 10.0) -> Any:
        """Return once the entry `key` is in this node's ledger (or the timeout passes), with
        this node's wall-clock time of first seeing it."""
        if not 0 < timeout_s <= MAX_WAIT_S:
            raise HTTPException(400, f"timeout_s must be in (0, {MAX_WAIT_S}]")
        ledger = daemon.ledger
        if ledger is None:
            raise HTTPException(503, "the ledger is not open yet")
        with trio.move_on_after(timeout_s):
            while True:
                if ledger.entry(key) is not None:
                    return {"key": key, "present": True, "seen_at_ms": int(time.time() * 1000)}
                await trio.sleep(WAIT_POLL_S)
        return {"key": key, "present": False, "seen_at_ms": None}
