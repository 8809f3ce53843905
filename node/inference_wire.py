"""The engine's RPC methods as seen on the wire, and the calling side (no torch needed)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgpack
from libp2p.peer.id import ID as PeerID
from pydantic import BaseModel, Field

from knexa.net.rpc import ErrorCode, RpcError, RpcService, receive_tensors

METHOD_GENERATE = "engine.generate"
METHOD_PREFILL = "engine.prefill"
METHOD_SCORE = "engine.score"
META_TENSOR = "__knexa_kv_meta__"
MAX_KV_BYTES = 2 << 30
MAX_NEW_TOKENS = 4096


class Message(BaseModel):
    role: str
    content: str


class GenerateParams(BaseModel):
    temperature: float = Field(0.0, ge=0, le=5)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    seed: int | None = None
    max_new_tokens: int = Field(128, ge=1, le=MAX_NEW_TOKENS)
    stop: list[str] = Field(default_factory=list, max_length=16)


class GenerateCall(BaseModel):
    messages: list[Message] | None = None
    prompt: str | None = None
    params: GenerateParams = Field(default_factory=GenerateParams)
    adapter: str | None = None


class PrefillCall(BaseModel):
    messages: list[Message] | None = None
    prompt: str | None = None
    token_ids: list[int] | None = None
    adapter: str | None = None


class ScoreCall(BaseModel):
    prompt: str
    completion: str
    adapter: str | None = None


class ScoreReply(BaseModel):
    token_ids: list[int]
    logprobs: list[float]
    argmax_token_ids: list[int]
    argmax_logprobs: list[float]
    prompt_tokens: int


def register_no_engine(rpc: RpcService, peer_id: str) -> None:
    """On a node started with model = none: the engine's methods answer UNAVAILABLE with the reason, instead
    of the UNKNOWN_METHOD an unregistered method gets, which tells a caller nothing."""

    async def no_model(request: Any, ctx: Any) -> None:
        raise RpcError(ErrorCode.UNAVAILABLE, f"peer {peer_id} runs no model (started with model = none)")

    rpc.register(METHOD_GENERATE, no_model, kind="server_stream")
    rpc.register(METHOD_PREFILL, no_model, kind="server_stream")
    rpc.register(METHOD_SCORE, no_model)


# -- the calling side ------------------------------------------------------------
@asynccontextmanager
async def remote_generate(
    rpc: RpcService, peer: PeerID, call: GenerateCall, timeout_s: float = 300.0
) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
    """Stream a generation from `peer`: `{"delta": ...}` items, then `{"result": ...}`."""
    async with rpc.server_stream(peer, METHOD_GENERATE, call, timeout=timeout_s) as responses:
        yield responses


async def remote_prefill(
    rpc: RpcService, peer: PeerID, call: PrefillCall, timeout_s: float = 300.0, max_bytes: int = MAX_KV_BYTES
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fetch `peer`'s KV cache for a prompt: (torch tensors by name, metadata)."""
    async with rpc.server_stream(peer, METHOD_PREFILL, call, timeout=timeout_s) as responses:
        tensors = await receive_tensors(responses, max_total=max_bytes, framework="torch")
    raw_meta = tensors.pop(META_TENSOR, None)
    if raw_meta is None:
        raise RpcError(ErrorCode.PROTOCOL_ERROR, "prefill stream carried no metadata")
    try:
        meta = msgpack.unpackb(raw_meta.numpy().tobytes(), raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as exc:
        raise RpcError(ErrorCode.PROTOCOL_ERROR, f"bad prefill metadata: {exc}") from None
    if not isinstance(meta, dict):
        raise RpcError(ErrorCode.PROTOCOL_ERROR, "prefill metadata is not a map")
    return tensors, meta
