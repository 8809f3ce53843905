"""KV collaboration between nodes of different models: the sharer side (`kv.share`, `kv.hint`) and the
receiver's fused, hinted and private paths.

Fused (C2C): the receiver sends a text to a sharer of another model, which prefills it with its own model
and streams back the cache with each token's character offsets. The receiver prefills the same text, fuses
the two caches with the fuser for that pair (fuser.py), and decodes alone: its context is the fused cache of
the shared text followed by its own prompt. Text hint: for a pair with no fuser the sharer answers in a
few words and the receiver puts that hint in front of the question. Private mode: the receiver first
rephrases the query with its own model and only the rephrased text leaves the node; a rephrasing that
still contains the query is not sent at all."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import trio
from libp2p.peer.id import ID as PeerID

from knexa.net.rpc import ErrorCode, RpcError, RpcService
from knexa.net.rpc.tensor_stream import tensor_messages
from knexa.node.engine import EngineError, GenerationRequest, GenerationResult, SamplingParams

from .fuser import CacheFuser, FuserError, align_tokens, load_fuser
from .kv_names import pairs_of, tensors_of
from .protocol import (
    METHOD_HINT,
    METHOD_SHARE,
    HintCall,
    HintReply,
    ShareCall,
    cache_payload,
    fetch_share,
)

log = logging.getLogger("knexa.kvshare")

PATH_FUSED = "fused"
PATH_HINT = "text-hint"
REPHRASE_INSTRUCTION = (
    "Rewrite the following request in other words. Keep what is asked; leave out names, numbers and personal "
    "details. Reply with the rewritten request only.\n\n"
)


@dataclass
class ExchangeOutcome:
    path: str
    peer: str | None = None
    fuser: str | None = None
    shared_text: str | None = None  # what left the node (None: nothing did)
    hint: str | None = None
    reason: str = ""
    timings: dict[str, float] = field(default_factory=dict)


class KvExchange:
    """Serves `kv.share` and `kv.hint` from this node's engine and runs the receiver's side."""

    def __init__(
        self,
        rpc: RpcService,
        require_engine: Callable[[], Any],
        fuser_dir: Path | None = None,
        timeout_s: float = 120.0,
        max_bytes: int = 2 << 30,
    ) -> None:
        self.rpc = rpc
        self.require_engine = require_engine
        self.fuser_dir = fuser_dir
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self._fusers: dict[str, CacheFuser] = {}
        # Test seam: every text this node received as a sharer, to check what peers send it.
        self.on_received: Callable[[str, str], None] = lambda method, text: None
        rpc.register(METHOD_SHARE, self._handle_share, ShareCall, None, kind="server_stream")
        rpc.register(METHOD_HINT, self._handle_hint, HintCall, HintReply)

    # -- the sharer's side ----------------------------------------------------------------------------
    def _encode(self, text: str) -> tuple[list[int], list[list[int]]]:
        enc = self.require_engine().tokenizer()(text, add_special_tokens=True, return_offsets_mapping=True)
        return list(enc["input_ids"]), [list(o) for o in enc["offset_mapping"]]

    async def _handle_share(self, call: ShareCall, ctx: Any) -> None:
        self.on_received(METHOD_SHARE, call.prompt)
        try:
            ids, offsets = self._encode(call.prompt)
            if not ids:
                raise RpcError(ErrorCode.BAD_REQUEST, "the text is empty after tokenization")
            tensors, meta = await self.require_engine().prefill(ids)
        except EngineError as exc:
            raise RpcError(ErrorCode.UNAVAILABLE, f"{exc.code}: {exc}") from None
        meta["offsets"] = offsets
        for message in tensor_messages(cache_payload(tensors, meta)):
            await ctx.send(message)

    async def _handle_hint(self, call: HintCall, ctx: Any) -> HintReply:
        self.on_received(METHOD_HINT, call.prompt)
        engine = self.require_engine()
        try:
            result = await engine.generate(_chat_or_prompt(engine, call.prompt, call.max_new_tokens))
        except EngineError as exc:
            raise RpcError(ErrorCode.UNAVAILABLE, f"{exc.code}: {exc}") from None
        return HintReply(hint=result.text.strip(), model=str((engine.status().get("model") or {}).get("name")))

    # -- fusers -------------------------------------------------------------------------------------------
    def fuser(self, name: str) -> CacheFuser:
        if name not in self._fusers:
            if self.fuser_dir is None:
                raise FuserError("this node has no fuser folder")
            self._fusers[name] = load_fuser(self.fuser_dir, name).eval()
        return self._fusers[name]

    def find_fuser(self, sharer_model: Sequence[str]) -> str | None:
        """The name of a fuser in the fuser folder from any of `sharer_model` (names or weights hashes) to this
        node's model; None when there is none."""
        if self.fuser_dir is None or not self.fuser_dir.is_dir():
            return None
        model = self.require_engine().status().get("model") or {}
        mine = {model.get("name"), model.get("weights_sha256")}
        for description in sorted(self.fuser_dir.glob("*.json")):
            try:
                spec = json.loads(description.read_text())
            except (OSError, ValueError):
                continue
            if spec.get("sharer_model") in set(sharer_model) and spec.get("receiver_model") in mine:
                return description.stem
        return None

    # -- the receiver's side ----------------------------------------------------------------------------
    async def rephrase(self, query: str, max_new_tokens: int = 64) -> str | None:
        """The query rewritten by this node's own model; None when the rewrite is empty or still holds the
        query (then nothing may be sent)."""
        engine = self.require_engine()
        result = await engine.generate(_chat_or_prompt(engine, REPHRASE_INSTRUCTION + query, max_new_tokens))
        text = result.text.strip()
        if not text or _normal(query) in _normal(text):
            return None
        return text

    async def fused_generate(
        self, query: str, peer: PeerID, fuser_name: str, params: SamplingParams, *, private: bool = False
    ) -> tuple[GenerationResult, ExchangeOutcome]:
        """Decode the query here on top of the fused cache of the (rephrased, when private) shared text."""
        outcome = ExchangeOutcome(PATH_FUSED, peer=peer.to_base58(), fuser=fuser_name)
        engine = self.require_engine()
        fuser = self.fuser(fuser_name)
        shared = await self._shared_text(query, private, outcome)
        started = time.perf_counter()
        sharer_kv, sharer_meta = await fetch_share(
            self.rpc, peer, ShareCall(prompt=shared), timeout_s=self.timeout_s, max_bytes=self.max_bytes
        )
        outcome.timings["fetch_s"] = time.perf_counter() - started
        ids, offsets = self._encode(shared)
        own_kv, own_meta = await engine.prefill(ids)
        started = time.perf_counter()
        # The fuser is small and not the engine's model: it runs in a helper thread so the trio loop stays free.
        fused = await trio.to_thread.run_sync(self._fuse, fuser, own_kv, own_meta, sharer_kv, sharer_meta, offsets)
        outcome.timings["fuse_s"] = time.perf_counter() - started
        continuation = self._prompt_ids(query)
        request = GenerationRequest(params=params)
        result = await engine.generate_from_cache(fused, own_meta, continuation, request)
        return result, outcome

    def _fuse(
        self, fuser: CacheFuser, own_kv: dict, own_meta: dict, sharer_kv: dict, sharer_meta: dict,
        offsets: list[list[int]],
    ) -> dict[str, torch.Tensor]:
        spec = fuser.spec
        sharer_names = (sharer_meta.get("weights_sha256"), sharer_meta.get("model_name"))
        if spec.sharer_model and spec.sharer_model not in sharer_names:
            raise FuserError(f"fuser {spec.sharer_model[:16]} does not fit the sharer's model")
        receiver = pairs_of(own_kv, int(own_meta["num_layers"]))
        sharer = pairs_of(sharer_kv, int(sharer_meta.get("num_layers", 0)))
        alignment = align_tokens([tuple(o) for o in offsets], [tuple(o) for o in sharer_meta["offsets"]])
        with torch.no_grad():
            fused = fuser(
                [(k.float(), v.float()) for k, v in receiver], [(k.float(), v.float()) for k, v in sharer], alignment
            )
        dtype = receiver[0][0].dtype
        return tensors_of([(k.to(dtype).contiguous(), v.to(dtype).contiguous()) for k, v in fused])

    async def hint_generate(
        self, query: str, peer: PeerID, params: SamplingParams, *, private: bool = False
    ) -> tuple[GenerationResult, ExchangeOutcome]:
        """Ask the peer for a short text hint, then answer here with the hint in front of the query."""
        outcome = ExchangeOutcome(PATH_HINT, peer=peer.to_base58())
        shared = await self._shared_text(query, private, outcome)
        started = time.perf_counter()
        reply = await self.rpc.call(
            peer, METHOD_HINT, HintCall(prompt=shared), timeout=self.timeout_s, response_model=HintReply
        )
        outcome.timings["hint_s"] = time.perf_counter() - started
        outcome.hint = reply.hint
        engine = self.require_engine()
        prompt = f"A peer model ({reply.model}) suggests: {reply.hint}\n\n{query}" if reply.hint else query
        request = _chat_or_prompt(engine, prompt, params.max_new_tokens)
        request = GenerationRequest(messages=request.messages, prompt=request.prompt, params=params)
        return await engine.generate(request), outcome

    async def _shared_text(self, query: str, private: bool, outcome: ExchangeOutcome) -> str:
        if not private:
            outcome.shared_text = query
            return query
        rephrased = await self.rephrase(query)
        if rephrased is None:
            raise PrivacyRefused("the rephrased query was empty or still contained the query; nothing was sent")
        outcome.shared_text = rephrased
        return rephrased

    def _prompt_ids(self, query: str) -> list[int]:
        tokenizer = self.require_engine().tokenizer()
        if tokenizer.chat_template:
            text = tokenizer.apply_chat_template([{"role": "user", "content": query}], add_generation_prompt=True,
                                                 tokenize=False)
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(tokenizer(query, add_special_tokens=False)["input_ids"])


class PrivacyRefused(Exception):
    """Private mode could not produce a text safe to send."""


def _normal(text: str) -> str:
    return " ".join(text.lower().split())


def _chat_or_prompt(engine: Any, text: str, max_new_tokens: int) -> GenerationRequest:
    params = SamplingParams(max_new_tokens=max_new_tokens)
    if engine.tokenizer().chat_template:
        return GenerationRequest(messages=[{"role": "user", "content": text}], params=params)
    return GenerationRequest(prompt=text, params=params)
