"""(keys, values) pairs to and from the engine's named KV tensors (`layers.{i}.keys` / `.values`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from knexa.node.engine.kv import key_name, value_name


def pairs_of(tensors: Mapping[str, torch.Tensor], num_layers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    try:
        return [(tensors[key_name(i)], tensors[value_name(i)]) for i in range(num_layers)]
    except KeyError as exc:
        raise ValueError(f"the cache has no tensor {exc}") from None


def tensors_of(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    out = {}
    for i, (keys, values) in enumerate(pairs):
        out[key_name(i)], out[value_name(i)] = keys, values
    return out
