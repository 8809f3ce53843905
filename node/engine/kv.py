"""KV caches as plain named tensors plus a msgpack-able metadata dict, and the checks on import.

Layout: `layers.{i}.keys` and `layers.{i}.values`, each (1, kv_heads, tokens, head_dim), CPU and
contiguous, in the model's dtype. The metadata names the model by its weights hash; a cache is only
meaningful for the exact weights that produced it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .device import dtype_name
from .errors import IncompatibleCache
from .identity import ModelIdentity

KV_FORMAT = "knexa-kv/1"


def key_name(layer: int) -> str:
    return f"layers.{layer}.keys"


def value_name(layer: int) -> str:
    return f"layers.{layer}.values"


def export_cache(
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    token_ids: Sequence[int],
    identity: ModelIdentity,
    adapter: str | None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    for index, (keys, values) in enumerate(pairs):
        tensors[key_name(index)] = keys.detach().to("cpu").contiguous()
        tensors[value_name(index)] = values.detach().to("cpu").contiguous()
    metadata = {
        "format": KV_FORMAT,
        "model_name": identity.name,
        "weights_sha256": identity.weights_sha256,
        "tokenizer_sha256": identity.tokenizer_sha256,
        "dtype": identity.dtype,
        "num_layers": len(pairs),
        "num_kv_heads": identity.num_kv_heads,
        "head_dim": identity.head_dim,
        "token_ids": [int(t) for t in token_ids],
        "adapter": adapter,
    }
    return tensors, metadata


def check_import(
    tensors: Mapping[str, Any], metadata: Mapping[str, Any], identity: ModelIdentity
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[int]]:
    """The (keys, values) pairs and token ids of an imported cache; IncompatibleCache saying what is
    wrong when it does not belong to this model or is malformed."""
    if not isinstance(metadata, Mapping) or metadata.get("format") != KV_FORMAT:
        raise IncompatibleCache(f"metadata format must be {KV_FORMAT!r}")
    if metadata.get("weights_sha256") != identity.weights_sha256:
        raise IncompatibleCache(
            f"cache is from another model (weights {str(metadata.get('weights_sha256'))[:12]}, "
            f"this engine runs {identity.weights_sha256[:12]} {identity.name})"
        )
    if metadata.get("dtype") != identity.dtype:
        raise IncompatibleCache(f"cache dtype {metadata.get('dtype')} differs from the engine's {identity.dtype}")
    if metadata.get("num_layers") != identity.num_layers:
        raise IncompatibleCache(f"cache has {metadata.get('num_layers')} layers, the model {identity.num_layers}")
    token_ids = metadata.get("token_ids")
    if (
        not isinstance(token_ids, list | tuple)
        or not token_ids
        or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < identity.vocab_size for t in token_ids)
    ):
        raise IncompatibleCache("metadata token_ids must be a non-empty list of token ids of this vocabulary")
    expected_names = {key_name(i) for i in range(identity.num_layers)} | {
        value_name(i) for i in range(identity.num_layers)
    }
    if set(tensors) != expected_names:
        missing = sorted(expected_names - set(tensors))[:3]
        extra = sorted(set(tensors) - expected_names)[:3]
        raise IncompatibleCache(f"cache tensor names do not match the model: missing {missing}, unexpected {extra}")
    shape = (1, identity.num_kv_heads, len(token_ids), identity.head_dim)
    pairs = []
    for index in range(identity.num_layers):
        pair = []
        for name in (key_name(index), value_name(index)):
            tensor = tensors[name]
            if not isinstance(tensor, torch.Tensor):
                raise IncompatibleCache(f"{name} is not a tensor")
            if dtype_name(tensor.dtype) != identity.dtype:
                raise IncompatibleCache(f"{name} has dtype {dtype_name(tensor.dtype)}, expected {identity.dtype}")
            if tuple(tensor.shape) != shape:
                raise IncompatibleCache(f"{name} has shape {tuple(tensor.shape)}, expected {shape}")
            pair.append(tensor)
        pairs.append((pair[0], pair[1]))
    return pairs, [int(t) for t in token_ids]
