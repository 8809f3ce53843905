"""Picking the next token of each batch row from its logits, with per-row parameters."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .sampling import SamplingParams


def new_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.greedy:
        return None
    generator = torch.Generator(device=device)
    if params.seed is not None:
        generator.manual_seed(params.seed)
    else:
        generator.seed()
    return generator


def pick_tokens(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> list[int]:
    """logits: (rows, vocab) of the last position. Greedy rows take the argmax, others sample."""
    greedy = logits.argmax(dim=-1).tolist()
    return [
        greedy[row] if p.greedy else _sample(logits[row], p, generators[row]) for row, p in enumerate(params)
    ]


def _sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    scores = logits.float() / params.temperature
    if params.top_k and params.top_k < scores.numel():
        threshold = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < threshold, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
        # Drop a token when the ones ranked above it already reach top_p; the first always stays.
        drop = cumulative - torch.softmax(sorted_scores, dim=-1) >= params.top_p
        scores = scores.index_put((order[drop],), torch.tensor(float("-inf"), device=scores.device))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())
