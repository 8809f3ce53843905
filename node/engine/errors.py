"""Engine errors. Each carries a stable `code` that the HTTP API and the mesh RPC can pass on as-is."""

from __future__ import annotations


class EngineError(Exception):
    """Base of every error the engine raises to its callers."""

    code = "engine_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class InvalidRequest(EngineError):
    """A request field is missing, of the wrong type or out of range."""

    code = "invalid_request"


class InvalidMessages(InvalidRequest):
    """Chat messages are not a list of {"role": str, "content": str}."""

    code = "invalid_messages"


class ContextLengthExceeded(InvalidRequest):
    """Prompt plus max_new_tokens do not fit in the model's context window."""

    code = "context_length_exceeded"


class UnknownAdapter(InvalidRequest):
    """The request names an adapter that is not loaded."""

    code = "unknown_adapter"


class AdapterError(EngineError):
    """An adapter folder could not be loaded, or an id clashes with a loaded one."""

    code = "adapter_error"


class AdapterBusy(AdapterError):
    """The adapter cannot be unloaded while running requests use it."""

    code = "adapter_busy"


class IncompatibleCache(InvalidRequest):
    """An imported KV cache belongs to another model or has the wrong layout."""

    code = "incompatible_cache"


class EngineOverloaded(EngineError):
    """The bounded request queue is full; retry later or elsewhere."""

    code = "overloaded"


class EngineCrashed(EngineError):
    """The model failed while this request was in flight (a crash or out of memory)."""

    code = "engine_crashed"


class EngineDown(EngineError):
    """The engine is not serving: it failed to load or to recover. `status()` has the reason."""

    code = "engine_down"


class EngineClosed(EngineError):
    """The engine was shut down before the request finished."""

    code = "engine_closed"


class ModelLoadError(EngineError):
    """The model folder or the embedded model could not be loaded."""

    code = "model_load_error"
