"""Which requests share the running batch and how their caches line up; pure code.

The running batch keeps one KV cache of shape (rows, heads, width, head_dim) per layer. Each row's real
tokens are right-aligned and left-padded to `width`, so every decode step appends one column for all rows.
Rows join between decode steps (their own prefill is merged in with extra left padding) and leave as
soon as they finish (their row is dropped and all-padding columns on the left are trimmed)."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Removal:
    keep: list[int]  # row indices that stay, in order
    trim_left: int  # columns on the left that are padding for every remaining row


@dataclass(frozen=True)
class Addition:
    pad_existing: int  # columns of padding to add on the left of the rows already in the batch
    pad_new: list[int]  # columns of padding on the left of each joining row's cache


class BatchLayout:
    def __init__(self, max_rows: int) -> None:
        if max_rows < 1:
            raise ValueError("a batch needs at least one row")
        self.max_rows = max_rows
        self.keys: list[Hashable] = []
        self.lengths: list[int] = []  # real (non-padding) tokens of each row in the cache
        self.width = 0

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def free_rows(self) -> int:
        return self.max_rows - len(self.keys)

    def pads(self) -> list[int]:
        return [self.width - length for length in self.lengths]

    def add(self, joining: Sequence[tuple[Hashable, int]]) -> Addition:
        if len(joining) > self.free_rows:
            raise ValueError(f"{len(joining)} rows do not fit, {self.free_rows} free")
        if not joining:
            return Addition(0, [])
        new_width = max(self.width, *(length for _, length in joining))
        addition = Addition(new_width - self.width if self.keys else 0, [new_width - n for _, n in joining])
        for key, length in joining:
            self.keys.append(key)
            self.lengths.append(length)
        self.width = new_width
        return addition

    def remove(self, leaving: Sequence[Hashable]) -> Removal:
        gone = set(leaving)
        keep = [i for i, key in enumerate(self.keys) if key not in gone]
        self.keys = [self.keys[i] for i in keep]
        self.lengths = [self.lengths[i] for i in keep]
        new_width = max(self.lengths, default=0)
        removal = Removal(keep, self.width - new_width)
        self.width = new_width
        return removal

    def advance(self) -> None:
        """Every row got one more token in the cache."""
        self.lengths = [n + 1 for n in self.lengths]
        self.width += 1
