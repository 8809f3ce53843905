"""Prefill that shares KV caches between nodes running the same model.

A prefill first takes the longest prefix this node already holds, then looks on the DHT for a longer one a
peer announced (binary search over block boundaries: the announced set is prefix-closed, see prefix.py),
fetches it if the measured rates say fetching beats computing (plan.py), checks it, and computes only the
rest on the engine's worker. Whatever it computed goes into the bounded local store and its block prefixes
are announced. Any failure on the sharing path (no provider, unreachable provider, refused or corrupted
cache, a fetch slower than computing) ends in a local prefill with the reason recorded."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import trio
from libp2p.peer.id import ID as PeerID

from knexa.net.rpc import RpcError, RpcService, TensorCodecError
from knexa.net.rpc.tensor_stream import tensor_messages
from knexa.node.engine import EngineError, GenerationRequest, GenerationResult, IncompatibleCache, SamplingParams

from .plan import FetchPlan, RateMeter, plan_fetch
from .prefix import PrefixStore, block_key, block_lengths, cache_model_id, cache_nbytes, slice_cache
from .protocol import Cache, PrefixCall, PrefixRefused, fetch_prefix, register_prefix_method
from .settings import KvShareSettings

log = logging.getLogger("knexa.kvshare")

PATH_PEER = "prefix-hit"  # a peer's cache of a prefix, fetched
PATH_LOCAL_CACHE = "local-cache"  # a prefix this node held already
PATH_LOCAL = "local"  # computed here from scratch


@dataclass
class PrefillOutcome:
    tensors: dict[str, torch.Tensor] = field(repr=False)
    metadata: dict[str, Any] = field(repr=False)
    path: str
    prompt_tokens: int
    prefix_tokens: int = 0  # tokens taken from a cache (peer's or own)
    computed_tokens: int = 0
    provider: str | None = None
    reason: str = ""
    fetch_s: float = 0.0
    compute_s: float = 0.0
    fetched_bytes: int = 0

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("tensors")
        out.pop("metadata")
        return out


class KvShareService:
    """Owned by the daemon next to the inference service; `await nursery.start(service.run)`."""

    def __init__(
        self,
        rpc: RpcService,
        discovery: Any,
        require_engine: Callable[[], Any],
        settings: KvShareSettings | None = None,
    ) -> None:
        self.rpc = rpc
        self.discovery = discovery
        self.require_engine = require_engine
        self.settings = (settings or KvShareSettings()).validate()
        self.store = PrefixStore(self.settings.store_bytes, self.settings.block, self.settings.max_blocks)
        self.compute_rate = RateMeter()  # tokens/s of this node's prefills
        self.fetch_rate = RateMeter()  # bytes/s of this node's prefix fetches
        self.paths: Counter[str] = Counter()
        self.served = 0
        self.refused = 0
        # Test seam: how the served payload becomes stream messages (a test corrupts a chunk here).
        self.outgoing: Callable[[dict[str, Any]], Iterable[Any]] = tensor_messages
        self._nursery: trio.Nursery | None = None
        register_prefix_method(rpc, self._serve, lambda payload: self.outgoing(payload))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    # -- serving ------------------------------------------------------------------------------------
    def _serve(self, model_id: str, token_ids: list[int]) -> Cache | None:
        found = self.store.lookup(model_id, token_ids)
        if found is not None:
            self.served += 1
        return found

    # -- the prefill ----------------------------------------------------------------------------------
    def model_id(self, adapter: str | None = None) -> str:
        status = self.require_engine().status()
        model = status.get("model") or {}
        return cache_model_id({"weights_sha256": model.get("weights_sha256"), "dtype": status.get("dtype"),
                               "adapter": adapter})

    def bytes_per_token(self) -> int:
        status = self.require_engine().status()
        model = status["model"]
        element = torch.empty(0, dtype=getattr(torch, status["dtype"])).element_size()
        return 2 * model["num_layers"] * model["num_kv_heads"] * model["head_dim"] * element

    def token_ids(self, prompt: str | None = None, messages: Sequence[dict[str, Any]] | None = None) -> list[int]:
        """The prompt's token ids as the engine would make them (chat template for messages)."""
        tokenizer = self.require_engine().tokenizer()
        if messages is not None:
            text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(tokenizer(prompt or "", add_special_tokens=True)["input_ids"])

    async def prefill(self, token_ids: Sequence[int], adapter: str | None = None) -> PrefillOutcome:
        """The KV cache of `token_ids`, from the best source available; never fails because of a peer."""
        ids = [int(t) for t in token_ids]
        model_id = self.model_id(adapter)
        held, entry = self.store.longest(model_id, ids)
        if held < min(self.settings.block, len(ids)):
            held, entry = 0, None  # a few shared template tokens (BOS, a system header) are not worth a path
        base: Cache | None = slice_cache(entry.tensors, entry.metadata, held) if entry is not None and held else None
        outcome = PrefillOutcome({}, {}, PATH_LOCAL_CACHE if base else PATH_LOCAL, len(ids), prefix_tokens=held)
        if self.settings.fetch != "never":
            fetched = await self._from_peers(model_id, ids, held, outcome)
            if fetched is not None:
                base = fetched
        tensors, meta = await self._compute(ids, adapter, base, outcome)
        outcome.tensors, outcome.metadata = tensors, meta
        self.paths[outcome.path] += 1
        self._keep(tensors, meta)
        log.info(
            "event=kv_prefill path=%s tokens=%d prefix=%d computed=%d provider=%s reason=%r",
            outcome.path, len(ids), outcome.prefix_tokens, outcome.computed_tokens, outcome.provider, outcome.reason,
        )
        return outcome

    async def generate(
        self, token_ids: Sequence[int], params: SamplingParams | None = None, adapter: str | None = None
    ) -> tuple[GenerationResult, PrefillOutcome]:
        """Prefill with sharing, then decode here from the cache."""
        outcome = await self.prefill(token_ids, adapter)
        request = GenerationRequest(params=params or SamplingParams(), adapter=adapter)
        result = await self.require_engine().generate_from_cache(outcome.tensors, outcome.metadata, request=request)
        return result, outcome

    async def _compute(self, ids: list[int], adapter: str | None, base: Cache | None, outcome: PrefillOutcome) -> Cache:
        engine = self.require_engine()
        started = time.perf_counter()
        if base is not None:
            try:
                cache = await engine.prefill(ids, adapter=adapter, prefix=base)
                outcome.compute_s = time.perf_counter() - started
                outcome.computed_tokens = len(ids) - len(base[1]["token_ids"])
                self._measure(outcome)
                return cache
            except IncompatibleCache as exc:
                # The engine's own checks (shapes, dtype, vocabulary) refused it: compute everything here.
                self.refused += 1
                outcome.path, outcome.prefix_tokens, outcome.provider = PATH_LOCAL, 0, None
                outcome.reason = f"cache refused by the engine: {exc}"
                started = time.perf_counter()
        cache = await engine.prefill(ids, adapter=adapter)
        outcome.compute_s = time.perf_counter() - started
        outcome.computed_tokens = len(ids)
        self._measure(outcome)
        return cache

    def _measure(self, outcome: PrefillOutcome) -> None:
        # A handful of tokens measures the call overhead, not the prefill rate.
        if outcome.computed_tokens >= 16:
            self.compute_rate.observe(outcome.computed_tokens, outcome.compute_s)

    # -- the peers' side ------------------------------------------------------------------------------
    async def _from_peers(self, model_id: str, ids: list[int], held: int, outcome: PrefillOutcome) -> Cache | None:
        length, providers = await self.find_longest(model_id, ids, above=held)
        if not providers:
            if not outcome.reason:
                outcome.reason = "no peer announced a longer prefix"
            return None
        plan = self._plan(length - held)
        if not plan.fetch:
            outcome.reason = plan.reason
            return None
        call = PrefixCall(model_id=model_id, token_ids=ids[:length])
        started = time.perf_counter()
        errors = []
        with trio.move_on_after(plan.deadline_s) as scope:
            for peer in providers[: self.settings.providers_tried]:
                try:
                    cache = await fetch_prefix(
                        self.rpc, peer, call, timeout_s=plan.deadline_s, max_bytes=self.settings.max_fetch_bytes
                    )
                except (RpcError, TensorCodecError, PrefixRefused, EngineError, OSError, trio.TooSlowError) as exc:
                    # A refused or corrupted cache, or an unreachable provider: the next one, then local.
                    self.refused += isinstance(exc, PrefixRefused | TensorCodecError)
                    errors.append(f"{peer.to_base58()[-6:]}: {type(exc).__name__}: {exc}")
                    continue
                elapsed = time.perf_counter() - started
                nbytes = cache_nbytes(cache[0])
                self.fetch_rate.observe(nbytes, elapsed)
                outcome.path, outcome.provider, outcome.prefix_tokens = PATH_PEER, peer.to_base58(), length
                outcome.fetch_s, outcome.fetched_bytes = elapsed, nbytes
                outcome.reason = plan.reason
                return cache
        outcome.fetch_s = time.perf_counter() - started
        if scope.cancelled_caught:
            errors.append(f"fetch passed its deadline of {plan.deadline_s:.3f}s (computing is faster)")
        outcome.reason = "fetch failed, computed here: " + "; ".join(errors)
        return None

    def _plan(self, tokens: int) -> FetchPlan:
        if self.settings.fetch == "always":
            return FetchPlan(True, "fetch forced by settings", self.settings.unmeasured_fetch_timeout_s)
        return plan_fetch(
            tokens, self.bytes_per_token(), self.compute_rate.rate, self.fetch_rate.rate,
            min_tokens=self.settings.min_prefix_tokens, unmeasured_deadline_s=self.settings.unmeasured_fetch_timeout_s,
        )

    async def find_longest(self, model_id: str, ids: Sequence[int], above: int = 0) -> tuple[int, list[PeerID]]:
        """The longest announced block prefix of `ids` longer than `above` tokens, and its providers (not this
        node). Longest first (the common case: the same context again), then a binary search."""
        lengths = [n for n in block_lengths(len(ids), self.settings.block, self.settings.max_blocks) if n > above]
        if not lengths:
            return 0, []
        cache: dict[int, list[PeerID]] = {}

        async def providers(index: int) -> list[PeerID]:
            if index not in cache:
                cache[index] = await self._providers(block_key(model_id, ids, lengths[index]))
            return cache[index]

        if await providers(len(lengths) - 1):
            return lengths[-1], cache[len(lengths) - 1]
        lo, hi, best = 0, len(lengths) - 2, -1
        while lo <= hi:
            mid = (lo + hi) // 2
            if await providers(mid):
                best, lo = mid, mid + 1
            else:
                hi = mid - 1
        return (lengths[best], cache[best]) if best >= 0 else (0, [])

    async def _providers(self, key: bytes) -> list[PeerID]:
        me = self.rpc.host.get_id()
        try:
            found = await self.discovery.find_providers(key, limit=self.settings.providers_tried + 1,
                                                        timeout=self.settings.lookup_timeout_s)
        except Exception as exc:  # the DHT is best effort here: no answer means compute locally
            log.debug("event=kv_lookup_failed error=%r", exc)
            return []
        peers = []
        for item in found:
            try:
                peer = PeerID.from_base58(item["peer_id"])
            except Exception:
                continue
            if peer != me:
                peers.append(peer)
        return peers

    # -- keeping and announcing -------------------------------------------------------------------------
    def _keep(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        change = self.store.put(tensors, meta)
        for key in change.removed:
            self.discovery.stop_providing(key)
        if change.added and self._nursery is not None:
            self._nursery.start_soon(self._announce, change.added)

    async def _announce(self, keys: list[bytes]) -> None:
        for key in keys:
            try:
                with trio.move_on_after(10):
                    await self.discovery.provide(key)
            except Exception as exc:  # alone or no DHT peers yet: Discovery re-announces what it provides
                log.debug("event=kv_announce_failed error=%r", exc)

    def stats(self) -> dict[str, Any]:
        return {
            "store": self.store.stats(), "paths": dict(self.paths), "served": self.served, "refused": self.refused,
            "compute_tokens_per_s": self.compute_rate.rate, "fetch_bytes_per_s": self.fetch_rate.rate,
        }
