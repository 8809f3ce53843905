"""Choosing the device, dtype and CPU thread count for the model."""

from __future__ import annotations

import os
import time

import torch

from .forward_cache import cache_kwargs

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def choose_device(requested: str | None) -> torch.device:
    if requested:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device cuda was requested but CUDA is not available")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def choose_dtype(requested: str, device: torch.device) -> torch.dtype | None:
    """The dtype to load in; None means "measure": on CPU, bfloat16 is only used when the loaded model
    decodes faster in it (see faster_on_cpu). Many CPUs lack fast bf16 kernels, and even with avx512_bf16
    the small matrix products of decoding can run slower than in float32 (measured on this project's CI
    machine: 116 ms vs 69 ms per SmolLM2 decode step), so it is never assumed."""
    if requested != "auto":
        return _DTYPES[requested]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


def decode_step_time(model: torch.nn.Module, steps: int = 4) -> float:
    """Best time of one single-row decode step after a short prefill."""
    from transformers import DynamicCache

    input_ids = torch.arange(1, 17, device=model.device).unsqueeze(0)
    best = float("inf")
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
        next_id = input_ids[:, -1:]
        for _ in range(steps):
            start = time.perf_counter()
            model(input_ids=next_id, use_cache=True, **cache_kwargs(model, cache))
            best = min(best, time.perf_counter() - start)
    return best


def faster_on_cpu(model: torch.nn.Module, margin: float = 1.2) -> torch.nn.Module:
    """The float32 model, or a bfloat16 copy of it when that decodes at least `margin` times faster."""
    import copy

    float32_time = decode_step_time(model)
    candidate = copy.deepcopy(model).to(torch.bfloat16)
    if decode_step_time(candidate) * margin < float32_time:
        return candidate
    del candidate
    return model


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}")
    return _DTYPES[name]


def configure_threads(requested: int | None) -> int:
    """Intra-op threads for CPU kernels: all usable cores but one unless configured. The spare core keeps
    the daemon's trio loop and networking responsive; and torch's thread pool spins at barriers, so
    competing for every core costs far more than it gains (measured on 2 cores with a tiny model: 1 ms
    per decode step with 1 thread, 10-15 ms with 2 while other processes ran)."""
    count = requested or max(1, len(os.sched_getaffinity(0)) - 1)
    torch.set_num_threads(count)
    return count
