"""The running batch's KV cache and attention mask, reshaped the way BatchLayout decides (torch side)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache

from .batch import Addition, Removal

Pairs = list[tuple[torch.Tensor, torch.Tensor]]


def _pad_left(tensor: torch.Tensor, columns: int) -> torch.Tensor:
    """Zero columns on the left of the sequence axis (dim -2 of a KV tensor, dim -1 of a mask)."""
    if columns == 0:
        return tensor
    if tensor.dim() == 2:
        return torch.nn.functional.pad(tensor, (columns, 0))
    return torch.nn.functional.pad(tensor, (0, 0, columns, 0))


def cache_pairs(cache: Any) -> Pairs:
    return [(layer.keys, layer.values) for layer in cache.layers]


def build_cache(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]] | None, model_config: Any) -> DynamicCache:
    if not pairs:
        return DynamicCache(config=model_config)
    return DynamicCache(ddp_cache_data=list(pairs), config=model_config)


class BatchCache:
    """Holds one DynamicCache across decode steps (the model appends to it in place) and rebuilds it only
    when rows join or leave: building a DynamicCache copies every tensor once."""

    def __init__(self, model_config: Any) -> None:
        self._config = model_config
        self._cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # (rows, width): 1 for real tokens, 0 for left padding

    @property
    def pairs(self) -> Pairs:
        return cache_pairs(self._cache) if self._cache is not None else []

    def clear(self) -> None:
        self._cache = None
        self.mask = None

    def add(self, addition: Addition, joining: Sequence[Pairs], lengths: Sequence[int]) -> None:
        if not joining:
            return
        device = joining[0][0][0].device
        current = self.pairs
        masks = [] if self.mask is None else [_pad_left(self.mask, addition.pad_existing)]
        for pad, length in zip(addition.pad_new, lengths, strict=True):
            masks.append(_pad_left(torch.ones(1, length, dtype=torch.long, device=device), pad))
        merged: Pairs = []
        for layer in range(len(joining[0])):
            keys = [_pad_left(current[layer][0], addition.pad_existing)] if current else []
            values = [_pad_left(current[layer][1], addition.pad_existing)] if current else []
            for pad, row in zip(addition.pad_new, joining, strict=True):
                keys.append(_pad_left(row[layer][0], pad))
                values.append(_pad_left(row[layer][1], pad))
            merged.append((torch.cat(keys), torch.cat(values)))
        self._cache = build_cache(merged, self._config)
        self.mask = torch.cat(masks)

    def remove(self, removal: Removal) -> None:
        if not removal.keep:
            self.clear()
            return
        assert self.mask is not None
        index = torch.tensor(removal.keep, device=self.mask.device)
        trim = removal.trim_left
        kept = [
            (keys.index_select(0, index)[:, :, trim:], values.index_select(0, index)[:, :, trim:])
            for keys, values in self.pairs
        ]
        self._cache = build_cache(kept, self._config)
        self.mask = self.mask.index_select(0, index)[:, trim:]

    def step_inputs(self, padded: bool) -> tuple[DynamicCache, torch.Tensor | None]:
        """The cache for the next decode step, and the mask covering it plus the new column (None when no
        row is padded: a single new query position needs no mask then)."""
        assert self.mask is not None and self._cache is not None
        ones = torch.ones(self.mask.shape[0], 1, dtype=self.mask.dtype, device=self.mask.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        return self._cache, self.mask if padded else None

    def after_step(self, cache: Any) -> None:
        self._cache = cache
