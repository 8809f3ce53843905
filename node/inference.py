"""The node's engine, served to the mesh over signed RPC and described in the ledger.

RPC methods (all signed by the RPC layer):
- `engine.generate` (server stream): chat messages or a prompt; streams
  `{"delta": text}` items, then `{"result": {...}}`.
- `engine.prefill` (server stream): the prompt's KV cache as a tensor stream
  (one integrity hash over the whole), its metadata riding along as a msgpack
  byte tensor so that a single call carries both.
- `engine.score` (unary): per-position log-probabilities and argmax tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import trio

from knexa.crdt.profile import Device, Load, ModelInfo, Throughput
from knexa.net.rpc import ErrorCode, RpcError, RpcService, send_tensors
from knexa.node.engine import (
    ContextLengthExceeded,
    Engine,
    EngineConfig,
    EngineDown,
    EngineError,
    EngineOverloaded,
    GenerationRequest,
    IncompatibleCache,
    InvalidMessages,
    InvalidRequest,
    SamplingParams,
    UnknownAdapter,
)
from knexa.node.inference_wire import (
    META_TENSOR,
    METHOD_GENERATE,
    METHOD_PREFILL,
    METHOD_SCORE,
    GenerateCall,
    PrefillCall,
    ScoreCall,
    ScoreReply,
)

log = logging.getLogger("knexa.inference")

def to_engine_request(call: GenerateCall) -> GenerationRequest:
    p = call.params
    return GenerationRequest(
        messages=[m.model_dump() for m in call.messages] if call.messages is not None else None,
        prompt=call.prompt,
        params=SamplingParams(
            temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, seed=p.seed,
            max_new_tokens=p.max_new_tokens, stop=tuple(p.stop),
        ),
        adapter=call.adapter,
    )


def rpc_error_for(exc: EngineError) -> RpcError:
    """The engine's errors, as the RPC codes a remote caller can act on."""
    if isinstance(exc, EngineOverloaded):
        code = ErrorCode.OVERLOADED
    elif isinstance(exc, InvalidRequest | InvalidMessages | ContextLengthExceeded | UnknownAdapter | IncompatibleCache):
        code = ErrorCode.BAD_REQUEST
    elif isinstance(exc, EngineDown):
        code = ErrorCode.UNAVAILABLE
    else:
        code = ErrorCode.INTERNAL
    return RpcError(code, f"{exc.code}: {exc}")


class InferenceService:
    """Owns the engine for the daemon's lifetime and serves it over RPC."""

    def __init__(
        self, config: EngineConfig, rpc: RpcService, on_change: Callable[[], None] = lambda: None
    ) -> None:
        self.config = config
        self.rpc = rpc
        self.on_change = on_change
        self.engine: Engine | None = None
        rpc.register(METHOD_GENERATE, self._handle_generate, GenerateCall, None, kind="server_stream")
        rpc.register(METHOD_PREFILL, self._handle_prefill, PrefillCall, None, kind="server_stream")
        rpc.register(METHOD_SCORE, self._handle_score, ScoreCall, ScoreReply)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # The daemon serves (API, mesh, ledger) while the model loads.
        async with Engine.open(self.config, wait_ready=False) as engine:
            self.engine = engine
            task_status.started()
            try:
                await self._watch_state(engine)
            finally:
                self.engine = None

    async def _watch_state(self, engine: Engine) -> None:
        last = None
        while True:
            state = (engine.status()["state"], tuple(engine.adapters()))
            if state != last:
                log.info("event=engine_state state=%s reason=%s", state[0], engine.status()["reason"])
                last = state
                self.on_change()
            await trio.sleep(0.5)

    # -- what the node reports ------------------------------------------------
    def status(self) -> dict[str, Any]:
        if self.engine is None:
            return {"state": "starting", "reason": None}
        return self.engine.status()

    def require_engine(self) -> Engine:
        if self.engine is None:
            raise EngineDown("the engine is not running")
        return self.engine

    def profile_parts(self) -> dict[str, Any]:
        """Device, models, throughput and load for the ledger profile."""
        status = self.status()
        model = status.get("model")
        device = str(status.get("device") or "cpu")
        parts: dict[str, Any] = {
            "device": Device(backend="cuda" if device.startswith("cuda") else "cpu", gpu_name=_gpu_name(device)),
            "throughput": Throughput(
                tokens_per_s=float(status.get("tokens_per_s") or 0.0),
                mean_service_time_s=float(status.get("mean_service_time_s") or 0.0),
            ),
            "load": Load(queue_length=int(status.get("queue_length") or 0) + int(status.get("running") or 0)),
            "models": (),
        }
        if model and status.get("state") == "ready":
            parts["models"] = (
                ModelInfo(
                    name=model["name"], architecture=model["architecture"], parameter_count=model["parameters"],
                    tokenizer_hash=model["tokenizer_sha256"], weights_hash=model["weights_sha256"],
                    dtype=model["dtype"],
                ),
            )
        return parts

    # -- RPC handlers -----------------------------------------------------------
    async def _handle_generate(self, call: GenerateCall, ctx: Any) -> None:
        try:
            async with self.require_engine().stream(to_engine_request(call)) as events:
                async for event in events:
                    if hasattr(event, "finish_reason"):
                        await ctx.send({"result": event.to_dict()})
                    else:
                        await ctx.send({"delta": event.text})
        except EngineError as exc:
            raise rpc_error_for(exc) from None

    async def _handle_prefill(self, call: PrefillCall, ctx: Any) -> None:
        try:
            tensors, meta = await self.require_engine().prefill(
                call.prompt if call.prompt is not None else call.token_ids,
                messages=[m.model_dump() for m in call.messages] if call.messages else None,
                adapter=call.adapter,
            )
        except EngineError as exc:
            raise rpc_error_for(exc) from None
        payload = dict(tensors)
        payload[META_TENSOR] = np.frombuffer(msgpack.packb(meta, use_bin_type=True), dtype=np.uint8)
        await send_tensors(ctx.send, payload)

    async def _handle_score(self, call: ScoreCall, ctx: Any) -> ScoreReply:
        try:
            result = await self.require_engine().score(call.prompt, call.completion, adapter=call.adapter)
        except EngineError as exc:
            raise rpc_error_for(exc) from None
        return ScoreReply(
            token_ids=list(result.token_ids), logprobs=list(result.logprobs),
            argmax_token_ids=list(result.argmax_token_ids), argmax_logprobs=list(result.argmax_logprobs),
            prompt_tokens=result.prompt_tokens,
        )


def _gpu_name(device: str) -> str:
    if not device.startswith("cuda"):
        return ""
    try:
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    except Exception:  # no CUDA runtime here: the name is informational
        return ""
