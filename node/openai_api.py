"""OpenAI-compatible endpoints: /v1/models and /v1/chat/completions (with SSE streaming).

One extension: `"peer": "<peer id>"` runs the completion on that peer's engine
over signed RPC instead of the local one.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, HTTPException
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from knexa.net.rpc import ErrorCode, RpcError
from knexa.node.api_params import peer_id_param
from knexa.node.inference_wire import MAX_NEW_TOKENS, GenerateCall, GenerateParams, Message, remote_generate

if TYPE_CHECKING:
    from knexa.node.daemon import Daemon


class ChatRequest(BaseModel):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    adapter: str | None = None
    peer: str | None = None

    def to_call(self) -> GenerateCall:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return GenerateCall(
            messages=self.messages,
            params=GenerateParams(
                temperature=self.temperature, top_p=self.top_p, seed=self.seed, stop=stop,
                max_new_tokens=self.max_completion_tokens or self.max_tokens or 256,
            ),
            adapter=self.adapter,
        )


def _http_error(exc: Exception) -> HTTPException:
    from knexa.node.engine import EngineDown, EngineError, EngineOverloaded

    if isinstance(exc, EngineOverloaded) or (isinstance(exc, RpcError) and exc.code == ErrorCode.OVERLOADED):
        return HTTPException(429, f"overloaded: {exc}", headers={"Retry-After": "1"})
    if isinstance(exc, EngineDown) or (isinstance(exc, RpcError) and exc.code == ErrorCode.UNAVAILABLE):
        return HTTPException(503, f"engine unavailable: {exc}")
    if isinstance(exc, RpcError) and exc.code in (ErrorCode.BAD_REQUEST, ErrorCode.UNKNOWN_METHOD):
        return HTTPException(400, str(exc))
    if isinstance(exc, RpcError):
        return HTTPException(502, f"peer failed: {exc}")
    if isinstance(exc, EngineError) and exc.code not in ("engine_crashed", "engine_closed", "internal"):
        return HTTPException(400, f"{exc.code}: {exc}")
    return HTTPException(500, f"engine error: {exc}")


async def _events(daemon: Daemon, request: ChatRequest) -> AsyncIterator[dict[str, Any]]:
    """`{"delta": text}` items then `{"result": {...}}`, locally or from a peer."""
    if request.peer:
        peer = peer_id_param(request.peer)
        async with remote_generate(daemon.rpc, peer, request.to_call()) as responses:
            async for item in responses:
                yield item
        return
    from knexa.node.inference import to_engine_request

    engine = daemon.require_inference().require_engine()
    async with engine.stream(to_engine_request(request.to_call())) as events:
        async for event in events:
            yield {"result": event.to_dict()} if hasattr(event, "finish_reason") else {"delta": event.text}


class AdapterLoad(BaseModel):
    id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")
    path: str


def add_adapter_routes(router: APIRouter, daemon: Daemon) -> None:
    """LoRA adapters of the local engine: list, load from a folder, unload; never merged."""

    async def on_engine(operation: Callable[[Any], Awaitable[list[str]]]) -> dict[str, list[str]]:
        if daemon.inference is None:
            raise HTTPException(503, "this node runs no model (started with model = none)")
        try:
            return {"adapters": await operation(daemon.inference.require_engine())}
        except Exception as exc:
            if not _is_engine_error(exc):
                raise
            raise _http_error(exc) from None

    async def listed(engine: Any) -> list[str]:
        return engine.adapters()

    @router.get("/v1/adapters")
    async def list_adapters() -> Any:
        return await on_engine(listed)

    @router.post("/v1/adapters")
    async def load_adapter(body: AdapterLoad) -> Any:
        return await on_engine(lambda engine: engine.load_adapter(body.id, body.path))

    @router.delete("/v1/adapters/{adapter_id}")
    async def unload_adapter(adapter_id: str) -> Any:
        return await on_engine(lambda engine: engine.unload_adapter(adapter_id))


def add_openai_routes(router: APIRouter, daemon: Daemon) -> None:
    @router.get("/v1/models")
    async def models() -> Any:
        if daemon.inference is None:
            return {"object": "list", "data": []}
        status = daemon.inference.status()
        model = status.get("model") or {}
        data = []
        if model:
            data.append({"id": model["name"], "object": "model", "created": 0, "owned_by": "knexa-node"})
        return {"object": "list", "data": data}

    @router.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest) -> Any:
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        name = request.model or _model_name(daemon)
        try:
            # Refuse what can be refused before a 200 starts streaming.
            if request.peer:
                peer_id_param(request.peer)
            elif daemon.inference is None:
                raise HTTPException(
                    503, "this node runs no model (started with model = none); ask a peer that runs one "
                    '("peer": <its peer id>, or knexa-node ask --peer)'
                )
            else:
                from knexa.node.inference import to_engine_request

                to_engine_request(request.to_call()).validate()
                daemon.require_inference().require_engine().status()
        except Exception as exc:
            if not _is_engine_error(exc):
                raise
            raise _http_error(exc) from None

        def chunk(delta: dict[str, Any], finish: str | None, usage: dict | None = None) -> str:
            body = {
                "id": completion_id, "object": "chat.completion.chunk", "created": created, "model": name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            if usage is not None:
                body["usage"] = usage
            return f"data: {json.dumps(body)}\n\n"

        if request.stream:
            async def sse() -> AsyncIterator[str]:
                yield chunk({"role": "assistant", "content": ""}, None)
                # Created and consumed in this task: the RPC stream's cancel scope
                # must not move between tasks.
                try:
                    async for item in _events(daemon, request):
                        if "delta" in item:
                            yield chunk({"content": item["delta"]}, None)
                        else:
                            result = item["result"]
                            yield chunk({}, result["finish_reason"], _usage(result))
                except Exception as exc:
                    if not (_is_engine_error(exc) or isinstance(exc, RpcError)):
                        raise
                    yield f"data: {json.dumps({'error': {'message': str(exc)}})}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(sse(), media_type="text/event-stream")

        text, result = [], None
        try:
            async for item in _events(daemon, request):
                if "delta" in item:
                    text.append(item["delta"])
                else:
                    result = item["result"]
        except Exception as exc:
            if not (_is_engine_error(exc) or isinstance(exc, RpcError)):
                raise
            raise _http_error(exc) from None
        result = result or {}
        return JSONResponse({
            "id": completion_id, "object": "chat.completion", "created": created, "model": name,
            "choices": [{
                "index": 0, "message": {"role": "assistant", "content": result.get("text", "".join(text))},
                "finish_reason": result.get("finish_reason", "stop"),
            }],
            "usage": _usage(result),
        })


def _is_engine_error(exc: BaseException) -> bool:
    # The engine (and torch) is imported only on nodes that run a model.
    engine = sys.modules.get("knexa.node.engine")
    return engine is not None and isinstance(exc, engine.EngineError)


def _usage(result: dict[str, Any]) -> dict[str, int]:
    prompt, completion = int(result.get("prompt_tokens", 0)), int(result.get("completion_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _model_name(daemon: Daemon) -> str:
    if daemon.inference is None:
        return "unknown"
    model = daemon.inference.status().get("model") or {}
    return model.get("name", "unknown")
