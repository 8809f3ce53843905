"""The engine as the daemon sees it: async methods on the trio loop, the model in one worker thread."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch
import trio

from .config import EngineConfig
from .errors import EngineClosed, EngineDown, EngineError, InvalidRequest
from .jobs import AdapterJob, AnswerLossJob, GenerateJob, Job, PrefillJob, ScoreJob, TrainJob
from .modelstate import chat_prompt_ids
from .queue import RequestQueue
from .requests import GenerationRequest, GenerationResult, ScoreResult, TextDelta, validate_messages
from .runner import Worker
from .training import MAX_TRAIN_TOKENS, TrainExample, TrainReport, TrainSpec, check_example

Event = TextDelta | GenerationResult
ANSWER_LOSS_BATCH = 8


class _TrioReply:
    """Delivers worker events into a trio memory channel without ever blocking the worker."""

    def __init__(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self.send_channel, self.receive_channel = trio.open_memory_channel[object](math.inf)
        self._cancelled = False

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        self._cancelled = True
        self.receive_channel.close()

    def send(self, event: object) -> None:
        try:
            self._token.run_sync_soon(self._deliver, event)
        except trio.RunFinishedError:
            pass  # the caller's trio run is over; nobody is listening

    def _deliver(self, event: object) -> None:
        try:
            self.send_channel.send_nowait(event)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the caller went away (cancelled); the worker drops the request at its next step


def _call_soon(token: trio.lowlevel.TrioToken, function: Callable[[], None]) -> None:
    try:
        token.run_sync_soon(function)
    except trio.RunFinishedError:
        pass


class Engine:
    """Use as `async with Engine.open(config) as engine:`; the worker thread starts on entry and is
    joined on exit. All model work goes through a bounded queue; a full queue raises EngineOverloaded."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config.validate()
        self._queue: RequestQueue[Job] = RequestQueue(config.max_queue)
        self._worker = Worker(self.config, self._queue)
        self._opened_at = time.monotonic()
        self._state_event = trio.Event()
        self._tokenizer_copy: tuple[Any, Any] | None = None

    @classmethod
    @asynccontextmanager
    async def open(
        cls, config: EngineConfig, *, wait_ready: bool = True, ready_timeout_s: float = 600.0
    ) -> AsyncIterator[Engine]:
        """Start the engine. With wait_ready, return once the model is loaded (EngineDown if it fails to
        load); without, return at once and let status() show "loading"."""
        engine = cls(config)
        token = trio.lowlevel.current_trio_token()
        engine._worker.on_state_change = lambda: _call_soon(token, engine._state_changed)
        engine._worker.thread.start()
        try:
            if wait_ready:
                await engine.wait_ready(ready_timeout_s)
            yield engine
        finally:
            with trio.CancelScope(shield=True):
                await engine._shutdown()

    async def wait_ready(self, timeout_s: float = 600.0) -> None:
        """Wait until the model is loaded (or reloaded after a crash); EngineDown if it never will be."""
        if await self.wait_settled(timeout_s) == "down":
            raise EngineDown(self._worker.reason or "the engine is down")

    async def wait_settled(self, timeout_s: float = 600.0) -> str:
        """Wait while the engine is loading or recovering; return the state it settles in."""
        with trio.fail_after(timeout_s):
            while True:
                changed = self._state_event
                if self._worker.state != "loading":
                    return self._worker.state
                await changed.wait()

    def _state_changed(self) -> None:
        self._state_event.set()
        self._state_event = trio.Event()

    async def _shutdown(self) -> None:
        for job in self._queue.close():
            job.reply.send(EngineClosed("the engine shut down before the request started"))
        # The worker finishes its current step (or its model load) and exits; no stray thread remains.
        await trio.to_thread.run_sync(self._worker.thread.join)
        self._tokenizer_copy = None  # it holds the model's state too

    # Operations ----------------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Run a request to the end and return the final record (whose `text` is the whole output)."""
        async with self.stream(request) as events:
            async for event in events:
                if isinstance(event, GenerationResult):
                    return event
        raise EngineClosed("the generation ended without a result")

    @asynccontextmanager
    async def stream(self, request: GenerationRequest) -> AsyncIterator[AsyncIterator[Event]]:
        """`async with engine.stream(request) as events: async for event in events:` yields TextDelta items
        then one GenerationResult. Leaving the block early cancels the request in the worker."""
        request.validate()
        reply = self._submit(GenerateJob(reply=_TrioReply(), request=request))
        try:
            yield self._events(reply)
        finally:
            reply.cancel()

    async def generate_from_cache(
        self,
        kv: Mapping[str, torch.Tensor],
        metadata: Mapping[str, Any],
        continuation: str | Sequence[int] | None = None,
        request: GenerationRequest | None = None,
    ) -> GenerationResult:
        """Continue from an imported KV cache (as prefill() exports it) plus optional continuation text or
        token ids. `request` carries sampling params and adapter; its prompt fields must be empty."""
        async with self.stream_from_cache(kv, metadata, continuation, request) as events:
            async for event in events:
                if isinstance(event, GenerationResult):
                    return event
        raise EngineClosed("the generation ended without a result")

    @asynccontextmanager
    async def stream_from_cache(
        self,
        kv: Mapping[str, torch.Tensor],
        metadata: Mapping[str, Any],
        continuation: str | Sequence[int] | None = None,
        request: GenerationRequest | None = None,
    ) -> AsyncIterator[AsyncIterator[Event]]:
        request = request or GenerationRequest()
        if request.messages is not None or request.prompt is not None or request.prompt_token_ids is not None:
            raise InvalidRequest("generate_from_cache takes its prompt from the cache; leave prompt fields empty")
        request.params.validate()
        if not isinstance(kv, Mapping) or not isinstance(metadata, Mapping):
            raise InvalidRequest("kv must be a dict of tensors and metadata a dict")
        job = GenerateJob(
            reply=_TrioReply(),
            request=request,
            imported_kv=dict(kv),
            imported_metadata=dict(metadata),
            continuation=continuation,
        )
        reply = self._submit(job)
        try:
            yield self._events(reply)
        finally:
            reply.cancel()

    async def prefill(
        self,
        prompt: str | Sequence[int] | None = None,
        *,
        messages: Sequence[dict[str, Any]] | None = None,
        adapter: str | None = None,
        prefix: tuple[Mapping[str, torch.Tensor], Mapping[str, Any]] | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Run a prompt (text, token ids or chat messages) and export its KV cache: named CPU tensors
        `layers.{i}.keys` / `layers.{i}.values` and msgpack-able metadata (see kv.py). `prefix`, an imported
        cache (tensors, metadata) of a prefix of the prompt's tokens, is checked and only the rest is computed;
        IncompatibleCache when it is not this model's or not a prefix."""
        if (prompt is None) == (messages is None):
            raise InvalidRequest("give exactly one of prompt or messages")
        if messages is not None:
            validate_messages(messages)
        job = PrefillJob(reply=_TrioReply(), prompt=prompt, messages=messages, adapter=adapter)
        if prefix is not None:
            kv, metadata = prefix
            if not isinstance(kv, Mapping) or not isinstance(metadata, Mapping):
                raise InvalidRequest("prefix must be (dict of tensors, metadata dict)")
            job.prefix_kv, job.prefix_metadata = dict(kv), dict(metadata)
        return await self._call(job)

    async def score(
        self, prompt: str | Sequence[int], completion: str | Sequence[int], *, adapter: str | None = None
    ) -> ScoreResult:
        """Log-probabilities and argmax tokens at each completion position, in one forward pass."""
        return await self._call(ScoreJob(reply=_TrioReply(), prompt=prompt, completion=completion, adapter=adapter))

    async def answer_loss(
        self, examples: Sequence[TrainExample], *, adapter: str | None = None, max_tokens: int = 256
    ) -> list[float]:
        """Each example's mean token loss (nats) on its answer and end-of-turn token, encoded as training
        encodes it: a validation loss that moves smoothly where greedy accuracy moves in whole answers. Runs
        ANSWER_LOSS_BATCH examples per worker round, so that requests decoding meanwhile wait at most one
        forward pass of that batch."""
        for example in examples:
            check_example(example)
        if not 8 <= max_tokens <= MAX_TRAIN_TOKENS:
            raise InvalidRequest(f"max_tokens must be in 8..{MAX_TRAIN_TOKENS}")
        losses: list[float] = []
        for start in range(0, len(examples), ANSWER_LOSS_BATCH):
            batch = list(examples[start : start + ANSWER_LOSS_BATCH])
            losses += await self._call(AnswerLossJob(reply=_TrioReply(), examples=batch, adapter=adapter,
                                                     max_tokens=max_tokens))
        return losses

    async def load_adapter(self, adapter_id: str, folder: str | Path) -> list[str]:
        """Load a LoRA adapter folder under adapter_id; returns the loaded adapter ids."""
        return await self._call(
            AdapterJob(reply=_TrioReply(), action="load", adapter_id=adapter_id, folder=str(folder))
        )

    async def unload_adapter(self, adapter_id: str) -> list[str]:
        return await self._call(AdapterJob(reply=_TrioReply(), action="unload", adapter_id=adapter_id))

    async def ensure_adapter(self, adapter_id: str, rank: int = 8, seed: int = 0) -> None:
        """A fresh in-memory LoRA adapter under adapter_id, unless one is loaded: rank `rank`, alpha 2 * rank,
        on the attention projections (q/k/v/o, or GPT-2's c_attn/c_proj); B = 0, so it changes nothing yet;
        A drawn from `seed`."""
        if not isinstance(rank, int) or not 0 < rank <= 256:
            raise InvalidRequest("rank must be in 1..256")
        await self._call(AdapterJob(reply=_TrioReply(), action="ensure", adapter_id=adapter_id, rank=rank, seed=seed))

    async def train_shadow(
        self, spec: TrainSpec, progress: Callable[[int, float], None] | None = None
    ) -> TrainReport:
        """Train spec.shadow_id, a copy of spec.live_id made at the start (or a fresh adapter of rank
        spec.rank if there is no live one), while the engine keeps serving. Training runs in the worker between
        decode steps: it yields while requests wait in the queue, and beside running requests only as many
        examples go through as keep their time per token within spec.latency_target_s, so one optimizer step
        may span several rounds; an idle engine trains without pause, and load that never leaves room still
        gives training spec.min_share of the worker's time, one example at a time. `progress(step, loss)` is
        called on the trio side after each optimizer step. Only the shadow's LoRA tensors change: the base
        weights and every other adapter stay bit-identical. While it trains, requests naming the shadow get
        AdapterBusy. One training at a time (AdapterBusy). Leaving early (cancellation) stops training at the
        next round and keeps the shadow as it was; a failing step raises AdapterError and affects no request."""
        spec.validate()
        reply = self._submit(TrainJob(reply=_TrioReply(), spec=spec))
        try:
            async for event in reply.receive_channel:
                if isinstance(event, BaseException):
                    raise event
                if isinstance(event, TrainReport):
                    return event
                if progress is not None:
                    progress(*event)
        finally:
            reply.cancel()
        raise EngineClosed("the training ended without a report")

    async def promote_shadow(self, shadow_id: str, live_id: str) -> None:
        """Copy the shadow's weights over the live adapter's (creating live if absent), atomically between
        two decode steps: every request admitted afterwards gets the new weights, and requests already decoding
        with the live adapter finish on the weights they started with (a hidden copy, dropped when they end).
        AdapterError if the shadow has non-finite weights or another shape; AdapterBusy while it trains."""
        await self._call(AdapterJob(reply=_TrioReply(), action="promote", adapter_id=live_id, source=shadow_id))

    async def save_adapter(self, adapter_id: str, folder: str | Path) -> None:
        """Write one adapter as a peft folder (safetensors) that load_adapter reads back."""
        await self._call(AdapterJob(reply=_TrioReply(), action="save", adapter_id=adapter_id, folder=str(folder)))

    def adapters(self) -> list[str]:
        model = self._worker.model
        return list(model.adapter_ids) if model is not None else []

    def status(self) -> dict[str, Any]:
        """A plain dict: state (loading/ready/down), reason, device, dtype, model identity, queue length,
        running requests, served/failed counts, tokens/s and mean service time (moving averages)."""
        worker = self._worker
        model = worker.model
        return {
            "state": worker.state,
            "reason": worker.reason,
            "device": str(model.device) if model else None,
            "dtype": model.identity.dtype if model else None,
            "model": model.identity.to_dict() if model else None,
            "load_time_s": model.load_time_s if model else None,
            "queue_length": len(self._queue),
            "queue_capacity": self._queue.capacity,
            "running": worker.active_rows,
            "max_batch": self.config.max_batch,
            "torch_threads": worker.torch_threads,
            "adapters": list(model.adapter_ids) if model else [],
            "training": worker.training.status() if worker.training is not None else None,
        "last_training": worker.last_training,
            "uptime_s": time.monotonic() - self._opened_at,
            **worker.stats.to_dict(),
        }

    def room_for_answer(self, messages: Sequence[dict[str, Any]]) -> int:
        """How many tokens the model's context leaves for an answer to this chat (at most 0 when the prompt
        alone fills it). Tokenizes on the caller's thread: meant for short prompts."""
        model = self._worker.model
        if model is None:
            raise EngineDown(self._worker.reason or "the model is not loaded")
        validate_messages(messages)
        prompt = chat_prompt_ids(self.tokenizer(), messages, model.identity.name)
        return model.identity.context_length - len(prompt)

    def tokenizer(self) -> Any:
        """A copy of the model's tokenizer for the trio side (counting tokens, decoding ids). A copy, because
        a fast tokenizer used from two threads at once fails with "Already borrowed"."""
        model = self._worker.model
        if model is None:
            raise EngineDown(self._worker.reason or "the model is not loaded")
        if self._tokenizer_copy is None or self._tokenizer_copy[0] is not model:
            self._tokenizer_copy = (model, copy.deepcopy(model.tokenizer))
        return self._tokenizer_copy[1]

    def inject_fault(
        self, message: str = "injected fault", out_of_memory: bool = False, during: str = "decode"
    ) -> None:
        """Test hook: the next decode step (or, with during="training", the next training step) raises as if
        the model had crashed (or run out of memory)."""
        self._worker.inject_fault(message, out_of_memory, during)

    # Plumbing ------------------------------------------------------------------------------------

    def _submit(self, job: Job) -> _TrioReply:
        if self._worker.state == "down":
            raise EngineDown(self._worker.reason or "the engine is down")
        self._queue.put_nowait(job)
        return job.reply  # type: ignore[return-value]

    async def _call(self, job: Job) -> Any:
        reply = self._submit(job)
        try:
            event = await reply.receive_channel.receive()
        finally:
            reply.cancel()
        if isinstance(event, BaseException):
            raise event
        return event

    @staticmethod
    async def _events(reply: _TrioReply) -> AsyncIterator[Event]:
        async for event in reply.receive_channel:
            if isinstance(event, EngineError):
                raise event
            yield event  # type: ignore[misc]
            if isinstance(event, GenerationResult):
                return

