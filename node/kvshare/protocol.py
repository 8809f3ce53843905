"""The `kv.prefix` RPC method: ask a peer for its cache of exactly these tokens of this model.

Request `PrefixCall` (unary args, server-streamed reply): the model id (weights hash, dtype, adapter; see
prefix.cache_model_id) and the prefix's token ids, no more: the requester sends only the tokens it expects
the provider to hold already (it found them announced), never the rest of its prompt.
Reply: a tensor stream (chunked, SHA-256 over the whole, never unpickled) of the cache's
`layers.{i}.keys/values` plus its msgpack metadata as a byte tensor, as `engine.prefill` replies.
Errors: UNAVAILABLE when the provider no longer holds the prefix (evicted, or the announcement was stale)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import msgpack
import numpy as np
import torch
from libp2p.peer.id import ID as PeerID
from pydantic import BaseModel, Field

from knexa.net.rpc import ErrorCode, RpcError, RpcService, receive_tensors
from knexa.net.rpc.tensor_stream import tensor_messages
from knexa.node.inference_wire import META_TENSOR

from .prefix import cache_model_id

METHOD_PREFIX = "kv.prefix"
MAX_PREFIX_TOKENS = 32768


class PrefixCall(BaseModel):
    model_id: str = Field(min_length=1, max_length=256)
    token_ids: list[int] = Field(min_length=1, max_length=MAX_PREFIX_TOKENS)


Cache = tuple[dict[str, torch.Tensor], dict[str, Any]]


def cache_payload(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> dict[str, Any]:
    payload: dict[str, Any] = dict(tensors)
    payload[META_TENSOR] = np.frombuffer(msgpack.packb(dict(metadata), use_bin_type=True), dtype=np.uint8)
    return payload


def register_prefix_method(
    rpc: RpcService,
    lookup: Callable[[str, list[int]], Cache | None],
    messages: Callable[[dict[str, Any]], Iterable[Any]] = tensor_messages,
) -> None:
    """Serve `kv.prefix` from `lookup(model_id, token_ids)`. `messages` turns the payload into stream messages
    (tests swap it to corrupt a chunk)."""

    async def handle(call: PrefixCall, ctx: Any) -> None:
        found = lookup(call.model_id, call.token_ids)
        if found is None:
            raise RpcError(ErrorCode.UNAVAILABLE, f"no cache of these {len(call.token_ids)} tokens for this model")
        for message in messages(cache_payload(*found)):
            await ctx.send(message)

    rpc.register(METHOD_PREFIX, handle, PrefixCall, None, kind="server_stream")


class PrefixRefused(Exception):
    """A fetched prefix cache is not what was asked for (another model, other tokens, malformed)."""


async def _receive_cache(
    rpc: RpcService, peer: PeerID, method: str, call: BaseModel, timeout_s: float, max_bytes: int
) -> Cache:
    """A cache streamed back by `method`: tensors and the metadata that rode along as a byte tensor."""
    async with rpc.server_stream(peer, method, call, timeout=timeout_s) as responses:
        tensors = await receive_tensors(responses, max_total=max_bytes, framework="torch")
    raw = tensors.pop(META_TENSOR, None)
    if raw is None:
        raise PrefixRefused("the stream carried no metadata")
    try:
        meta = msgpack.unpackb(raw.numpy().tobytes(), raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as exc:
        raise PrefixRefused(f"bad metadata: {exc}") from None
    if not isinstance(meta, dict):
        raise PrefixRefused("metadata is not a map")
    return tensors, meta


async def fetch_prefix(
    rpc: RpcService, peer: PeerID, call: PrefixCall, *, timeout_s: float, max_bytes: int
) -> Cache:
    """`peer`'s cache of `call.token_ids`; RpcError (transport, integrity hash, size) or PrefixRefused when the
    cache's metadata does not name the model and tokens asked for. The engine checks shapes and dtypes on import."""
    tensors, meta = await _receive_cache(rpc, peer, METHOD_PREFIX, call, timeout_s, max_bytes)
    if cache_model_id(meta) != call.model_id:
        raise PrefixRefused(f"cache is for model {cache_model_id(meta)[:24]}, asked for {call.model_id[:24]}")
    if meta.get("token_ids") != call.token_ids:
        raise PrefixRefused("cache covers other tokens than asked for")
    return tensors, meta


# -- between different models ------------------------------------------------------------------------------
METHOD_SHARE = "kv.share"  # the sharer's KV cache of a text, with its tokens' character offsets (for fusion)
METHOD_HINT = "kv.hint"  # the sharer's short text answer, for pairs without a fuser
MAX_SHARE_CHARS = 64_000


class ShareCall(BaseModel):
    """Only text crosses between models of different tokenizers; in private mode it is the rephrased query."""

    prompt: str = Field(min_length=1, max_length=MAX_SHARE_CHARS)


class HintCall(BaseModel):
    prompt: str = Field(min_length=1, max_length=MAX_SHARE_CHARS)
    max_new_tokens: int = Field(48, ge=1, le=256)


class HintReply(BaseModel):
    hint: str
    model: str


async def fetch_share(rpc: RpcService, peer: PeerID, call: ShareCall, *, timeout_s: float, max_bytes: int) -> Cache:
    """`peer`'s KV cache of `call.prompt` and its metadata (with `offsets`: one [start, end) per token)."""
    tensors, meta = await _receive_cache(rpc, peer, METHOD_SHARE, call, timeout_s, max_bytes)
    offsets, token_ids = meta.get("offsets"), meta.get("token_ids")
    if not isinstance(offsets, list) or not isinstance(token_ids, list) or len(offsets) != len(token_ids):
        raise PrefixRefused("shared cache metadata needs token_ids and one offset pair per token")
    if not all(isinstance(o, list | tuple) and len(o) == 2 and all(isinstance(x, int) for x in o) for o in offsets):
        raise PrefixRefused("offsets must be [start, end] integer pairs")
    return tensors, meta
