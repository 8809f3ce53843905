"""How a causal LM's forward takes and returns its KV cache, across transformers 5 releases.

Newer releases call the argument and the output field `cache`, warn on every `past_key_values`, and say they
will drop it; older ones know only `past_key_values`. pyproject allows any transformers 5.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """The keyword argument that hands `cache` to `model`'s forward (a peft wrapper passes it through)."""
    return {_cache_keyword(type(_base_model(model))): cache}


def output_cache(output: Any) -> Any:
    """The KV cache a forward returned."""
    cache = output.get("cache") if hasattr(output, "get") else None
    return cache if cache is not None else output.past_key_values


def _base_model(model: Any) -> Any:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


@functools.cache
def _cache_keyword(model_class: type) -> str:
    parameters = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"
