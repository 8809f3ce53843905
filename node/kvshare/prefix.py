"""Prefix caches held by a node: a store bounded by bytes (least recently used out first), and the
block-aligned prefix keys under which a node announces what it holds.

Pure: no I/O, no trio. Why blocks: a peer can only look a prefix up by its hash, so both sides must hash
the same lengths. Announcing every multiple of `block` tokens a cache covers makes the announced set
prefix-closed (a provider of length L also provides every shorter block), so the longest shared prefix
can be found with a binary search over the requester's own block boundaries."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from knexa.dht.keys import prefix_key


def cache_model_id(metadata: Mapping[str, Any]) -> str:
    """What a cache is valid for: the weights hash, the dtype and the adapter (a cache computed with an
    adapter or in another dtype cannot be imported by the plain model)."""
    adapter = metadata.get("adapter")
    base = f"{metadata.get('weights_sha256')}:{metadata.get('dtype')}"
    return f"{base}:{adapter}" if adapter else base


def block_lengths(num_tokens: int, block: int, max_blocks: int | None = None) -> list[int]:
    """The block-aligned prefix lengths of a prompt, shortest first (at most `max_blocks` of them)."""
    if block <= 0:
        raise ValueError("block must be positive")
    count = num_tokens // block
    if max_blocks is not None:
        count = min(count, max_blocks)
    return [block * i for i in range(1, count + 1)]


def block_key(model_id: str, token_ids: Sequence[int], length: int) -> bytes:
    """The DHT provider key of the first `length` tokens."""
    return prefix_key(model_id, list(token_ids[:length]))


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def cache_nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def slice_cache(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any], length: int
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The cache of the first `length` tokens: contiguous copies (they go on the wire) and metadata to match."""
    token_ids = list(metadata["token_ids"])
    if not 0 < length <= len(token_ids):
        raise ValueError(f"cannot cut a {len(token_ids)}-token cache to {length} tokens")
    sliced = {name: t[:, :, :length].contiguous() for name, t in tensors.items()}
    meta = dict(metadata)
    meta["token_ids"] = token_ids[:length]
    return sliced, meta


@dataclass
class Entry:
    model_id: str
    token_ids: tuple[int, ...]
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, Any]
    nbytes: int
    keys: list[bytes] = field(default_factory=list)


@dataclass(frozen=True)
class StoreChange:
    """What a put changed in the keys this node can announce: keys to announce, keys no entry holds any more."""

    added: list[bytes]
    removed: list[bytes]


class PrefixStore:
    """Prefilled caches, at most `max_bytes` in all; the least recently used go first. Each entry is
    indexed under the block keys of its prefixes, so a request for an announced key finds it at once."""

    def __init__(self, max_bytes: int, block: int = 64, max_blocks: int = 128) -> None:
        if max_bytes < 0 or block <= 0 or max_blocks <= 0:
            raise ValueError("max_bytes >= 0, block > 0 and max_blocks > 0")
        self.max_bytes = max_bytes
        self.block = block
        self.max_blocks = max_blocks
        self._entries: OrderedDict[tuple[str, tuple[int, ...]], Entry] = OrderedDict()
        self._by_key: dict[bytes, set[tuple[str, tuple[int, ...]]]] = {}
        self.bytes_used = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> StoreChange:
        """Keep a cache (as engine.prefill exports it). A cache larger than the whole store is not kept."""
        model_id = cache_model_id(metadata)
        ids = tuple(int(t) for t in metadata["token_ids"])
        nbytes = cache_nbytes(tensors)
        ident = (model_id, ids)
        removed: list[bytes] = []
        if ident in self._entries:
            self._entries.move_to_end(ident)
            return StoreChange([], [])
        if nbytes > self.max_bytes:
            return StoreChange([], [])
        while self.bytes_used + nbytes > self.max_bytes and self._entries:
            removed += self._drop(next(iter(self._entries)))
            self.evictions += 1
        entry = Entry(model_id, ids, dict(tensors), dict(metadata), nbytes)
        entry.keys = [block_key(model_id, ids, n) for n in block_lengths(len(ids), self.block, self.max_blocks)]
        self._entries[ident] = entry
        self.bytes_used += nbytes
        added = []
        for key in entry.keys:
            holders = self._by_key.setdefault(key, set())
            if not holders:
                added.append(key)
            holders.add(ident)
        # A key evicted and held again by the new entry changed nothing.
        kept = set(entry.keys)
        return StoreChange([k for k in added if k not in set(removed)], [k for k in removed if k not in kept])

    def _drop(self, ident: tuple[str, tuple[int, ...]]) -> list[bytes]:
        entry = self._entries.pop(ident)
        self.bytes_used -= entry.nbytes
        removed = []
        for key in entry.keys:
            holders = self._by_key.get(key, set())
            holders.discard(ident)
            if not holders:
                self._by_key.pop(key, None)
                removed.append(key)
        return removed

    def lookup(self, model_id: str, token_ids: Sequence[int]) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """The cache of exactly `token_ids`, cut from any entry that starts with them; None if none does."""
        ids = tuple(int(t) for t in token_ids)
        if not ids:
            return None
        # A scan: the store holds few entries (it is bounded by bytes, and caches are megabytes each).
        for ident, entry in self._entries.items():
            if entry.model_id == model_id and entry.token_ids[: len(ids)] == ids:
                self._entries.move_to_end(ident)
                return slice_cache(entry.tensors, entry.metadata, len(ids))
        return None

    def longest(self, model_id: str, token_ids: Sequence[int]) -> tuple[int, Entry | None]:
        """The longest common prefix of `token_ids` with a held entry of this model, and that entry."""
        best, best_entry = 0, None
        for entry in self._entries.values():
            if entry.model_id == model_id:
                n = common_prefix(entry.token_ids, token_ids)
                if n > best:
                    best, best_entry = n, entry
        if best_entry is not None:
            self._entries.move_to_end((best_entry.model_id, best_entry.token_ids))
        return best, best_entry

    def stats(self) -> dict[str, int]:
        return {
            "entries": len(self._entries), "bytes": self.bytes_used, "max_bytes": self.max_bytes,
            "keys": len(self._by_key), "evictions": self.evictions,
        }
