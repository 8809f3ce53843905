"""Units of work handed from the trio side to the worker thread, and how answers travel back."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .requests import GenerationRequest
from .training import TrainExample, TrainSpec


class Reply(Protocol):
    """Thread-safe, non-blocking delivery of events to the caller; `cancelled` once the caller left."""

    def send(self, event: object) -> None: ...

    @property
    def cancelled(self) -> bool: ...


@dataclass
class Job:
    reply: Reply
    submitted_at: float = field(default_factory=time.monotonic, init=False)


@dataclass
class GenerateJob(Job):
    request: GenerationRequest
    # Set for generate_from_cache: validated-later imported cache and the tokens it covers.
    imported_kv: dict[str, torch.Tensor] | None = None
    imported_metadata: dict[str, Any] | None = None
    continuation: str | Sequence[int] | None = None


@dataclass
class PrefillJob(Job):
    prompt: str | Sequence[int] | None = None
    messages: Sequence[dict[str, Any]] | None = None
    adapter: str | None = None
    # An imported cache of a prefix of the prompt (prefix-cache sharing): only the rest is computed.
    prefix_kv: dict[str, torch.Tensor] | None = None
    prefix_metadata: dict[str, Any] | None = None


@dataclass
class ScoreJob(Job):
    prompt: str | Sequence[int]
    completion: str | Sequence[int]
    adapter: str | None = None


@dataclass
class AnswerLossJob(Job):
    """Each example's mean token loss on its answer, the tokens that training puts its loss on."""

    examples: Sequence[TrainExample]
    adapter: str | None = None
    max_tokens: int = 256


@dataclass
class AdapterJob(Job):
    action: str  # "load", "unload", "create", "ensure" (create unless loaded), "promote" (source -> adapter_id), "save"
    adapter_id: str
    folder: str | None = None
    source: str | None = None
    rank: int = 8
    seed: int = 0


@dataclass
class TrainJob(Job):
    """Runs beside the batch: in each worker round as much of an optimizer step as the policy allows. The
    reply gets a (steps done, loss) tuple after each optimizer step, then the TrainReport."""

    spec: TrainSpec
