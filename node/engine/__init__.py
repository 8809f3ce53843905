"""The model engine: loading, continuous-batched generation, KV export/import, scoring and LoRA adapters.

Model work runs in one worker thread; the async API is called from trio:

    async with Engine.open(EngineConfig(model=path)) as engine:
        result = await engine.generate(GenerationRequest(prompt="Hello", params=SamplingParams(max_new_tokens=8)))
"""

from .adapters import create_random_lora_adapter
from .config import EMBEDDED_MODEL, EngineConfig
from .engine import Engine
from .errors import (
    AdapterBusy,
    AdapterError,
    ContextLengthExceeded,
    EngineClosed,
    EngineCrashed,
    EngineDown,
    EngineError,
    EngineOverloaded,
    IncompatibleCache,
    InvalidMessages,
    InvalidRequest,
    ModelLoadError,
    UnknownAdapter,
)
from .identity import ModelIdentity
from .kv import KV_FORMAT
from .models import ensure_embedded_model
from .requests import GenerationRequest, GenerationResult, ScoreResult, TextDelta
from .sampling import SamplingParams
from .training import TrainExample, TrainReport, TrainSpec

__all__ = [
    "EMBEDDED_MODEL",
    "KV_FORMAT",
    "AdapterBusy",
    "AdapterError",
    "ContextLengthExceeded",
    "Engine",
    "EngineClosed",
    "EngineConfig",
    "EngineCrashed",
    "EngineDown",
    "EngineError",
    "EngineOverloaded",
    "GenerationRequest",
    "GenerationResult",
    "IncompatibleCache",
    "InvalidMessages",
    "InvalidRequest",
    "ModelIdentity",
    "ModelLoadError",
    "SamplingParams",
    "ScoreResult",
    "TextDelta",
    "TrainExample",
    "TrainReport",
    "TrainSpec",
    "UnknownAdapter",
    "create_random_lora_adapter",
    "ensure_embedded_model",
]
