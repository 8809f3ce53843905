"""Training and evaluating a cache fuser on a text corpus: both models frozen, only the fuser learns.

Each text is cut in two at a receiver token boundary: the sharer and the receiver prefill the first part
(each with its own tokenizer), the fuser fuses the two caches, and the receiver, continuing from the fused
cache alone, is scored on the second part (next-token cross-entropy). This is the C2C setting: the fused
cache covers the prompt and the receiver decodes by itself."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from knexa.node.engine.forward_cache import cache_kwargs, output_cache
from knexa.node.engine.kvbatch import build_cache, cache_pairs

from .fuser import CacheFuser, PairList, align_tokens


@dataclass
class Side:
    """A frozen model and its tokenizer (a fast one: character offsets are needed for the token map)."""

    model: Any
    tokenizer: Any

    def __post_init__(self) -> None:
        self.model.eval()
        self.model.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    @torch.no_grad()
    def prefill(self, ids: Sequence[int]) -> PairList:
        input_ids = torch.tensor([list(ids)], device=self.device)
        output = self.model(input_ids=input_ids, use_cache=True,
                            **cache_kwargs(self.model, build_cache(None, self.model.config)))
        return cache_pairs(output_cache(output))


def fused_loss(fuser: CacheFuser, receiver: Side, sharer: Side, text: str, split: float = 0.5) -> torch.Tensor | None:
    """The receiver's loss on the second part of `text` given the fused cache of the first; None when the text
    is too short to split."""
    r_ids, r_offsets = receiver.encode(text)
    if len(r_ids) < 4:
        return None
    cut = min(max(2, int(len(r_ids) * split)), len(r_ids) - 2)
    prompt_end = r_offsets[cut - 1][1]
    s_ids, s_offsets = sharer.encode(text[:prompt_end])
    if not s_ids:
        return None
    # The fused cache covers the prompt but its last token, which the receiver runs again to get its first
    # logits (as the engine does when continuing from an imported cache).
    r_pairs = receiver.prefill(r_ids[: cut - 1])
    s_pairs = sharer.prefill(s_ids)
    fused = fuser(r_pairs, s_pairs, align_tokens(r_offsets[: cut - 1], s_offsets))
    rest = torch.tensor([r_ids[cut - 1 :]], device=receiver.device)
    positions = torch.arange(cut - 1, len(r_ids), device=receiver.device).unsqueeze(0)
    cache = build_cache(fused, receiver.model.config)
    output = receiver.model(input_ids=rest, position_ids=positions, use_cache=True,
                            **cache_kwargs(receiver.model, cache))
    logits = output.logits[0, :-1].float()
    return nn.functional.cross_entropy(logits, rest[0, 1:])


@torch.no_grad()
def evaluate(fuser: CacheFuser, receiver: Side, sharer: Side, texts: Sequence[str]) -> float:
    """Mean fused loss over texts (those long enough to split)."""
    losses = [loss.item() for text in texts if (loss := fused_loss(fuser, receiver, sharer, text)) is not None]
    if not losses:
        raise ValueError("no text long enough to evaluate on")
    return sum(losses) / len(losses)


def train_fuser(
    fuser: CacheFuser,
    receiver: Side,
    sharer: Side,
    texts: Sequence[str],
    *,
    steps: int,
    lr: float = 1e-3,
    seed: int = 0,
    time_budget_s: float | None = None,
    on_step: Callable[[int, float], None] = lambda step, loss: None,
) -> list[float]:
    """Train the fuser (in place) for `steps` texts drawn at random (or until time_budget_s); the per-step
    losses. Only the fuser's parameters are optimised."""
    usable = [t for t in texts if len(receiver.encode(t)[0]) >= 4]
    if not usable:
        raise ValueError("no text long enough to train on")
    fuser.to(receiver.device).train()
    optimizer = torch.optim.AdamW(fuser.parameters(), lr=lr)
    rng = random.Random(seed)
    started = time.monotonic()
    losses = []
    for step in range(steps):
        if time_budget_s is not None and time.monotonic() - started > time_budget_s:
            break
        loss = fused_loss(fuser, receiver, sharer, rng.choice(usable))
        if loss is None:
            continue
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(fuser.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        on_step(step, loss.item())
    fuser.eval()
    return losses
