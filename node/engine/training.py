"""Shadow-adapter training inside the serving engine (CoLLM): the live adapter keeps answering while a
shadow copy trains one optimizer step at a time between decode steps, and replaces it only when asked.

Two timescales: the step budget (`TrainSpec.steps`) is the slow loop, set by whoever asks for training;
`TrainingPolicy.examples_this_round` is the fast loop, run in every worker round, and keeps inference within
its latency target: training is skipped (the worker "yields") while requests wait in the queue, and beside
running requests only as many examples go through forward and backward as fit in the target together with
the decode step. One optimizer step may therefore span several rounds (gradient accumulation, with exactly
the loss of the whole batch); an idle worker runs whole steps. Under load that never leaves room (a queue
that never empties, or one example slower than the target), training still gets its floor share of the
worker's time (`TrainSpec.min_share`), one example at a time, so it slows down but never stalls.
"""

from __future__ import annotations

import math
import random
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import InvalidRequest
from .requests import validate_messages

MAX_TRAIN_EXAMPLES = 20_000
MAX_TRAIN_STEPS = 100_000
MAX_TRAIN_TOKENS = 512
IGNORE = -100

# transformers 5 warns on every training forward through peft; it says nothing about this engine.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
# peft moves its "active adapter" when one is unloaded; requests here name their adapter, so it never matters.
warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted", category=UserWarning)


@dataclass(frozen=True)
class TrainExample:
    prompt_messages: Sequence[dict[str, Any]]
    answer: str
    weight: float = 1.0


def check_example(example: object) -> None:
    """InvalidRequest unless example is a TrainExample with valid messages, an answer and a usable weight."""
    if not isinstance(example, TrainExample):
        raise InvalidRequest("examples must be TrainExample items")
    validate_messages(list(example.prompt_messages))
    if not isinstance(example.answer, str) or not example.answer:
        raise InvalidRequest("every example needs a non-empty answer")
    if not (example.weight >= 0 and math.isfinite(example.weight)):
        raise InvalidRequest("example weights must be finite and non-negative")


@dataclass(frozen=True)
class TrainSpec:
    live_id: str
    shadow_id: str
    examples: Sequence[TrainExample]
    steps: int
    lr: float = 3e-4
    batch_size: int = 4
    rank: int = 8
    seed: int = 0
    # Longest a running request may wait per token because a training step ran beside it.
    latency_target_s: float = 0.5
    max_tokens: int = 256
    # Least share of the worker's time that training gets when the target leaves it none (0: wait for room).
    min_share: float = 0.05

    def validate(self) -> TrainSpec:
        if not self.examples:
            raise InvalidRequest("training needs at least one example")
        if len(self.examples) > MAX_TRAIN_EXAMPLES:
            raise InvalidRequest(f"at most {MAX_TRAIN_EXAMPLES} training examples")
        if not 0 < self.steps <= MAX_TRAIN_STEPS:
            raise InvalidRequest(f"steps must be in 1..{MAX_TRAIN_STEPS}")
        if not (0 < self.lr < 1) or not 0 < self.batch_size <= 64 or not 0 < self.rank <= 256:
            raise InvalidRequest("lr must be in (0, 1), batch_size in 1..64, rank in 1..256")
        if not self.latency_target_s > 0 or not 8 <= self.max_tokens <= MAX_TRAIN_TOKENS:
            raise InvalidRequest(f"latency_target_s must be positive and max_tokens in 8..{MAX_TRAIN_TOKENS}")
        if not 0 <= self.min_share < 1:
            raise InvalidRequest("min_share must be in [0, 1)")
        if self.live_id == self.shadow_id:
            raise InvalidRequest("the shadow must have another id than the live adapter")
        for example in self.examples:
            check_example(example)
        if not any(e.weight > 0 for e in self.examples):
            raise InvalidRequest("at least one example must have a positive weight")
        return self


@dataclass(frozen=True)
class TrainReport:
    steps: int
    first_loss: float
    last_loss: float
    mean_loss: float
    seconds: float
    yielded_rounds: int
    floor_pieces: int = 0  # examples run only because training was owed its min_share

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "first_loss": self.first_loss, "last_loss": self.last_loss,
                "mean_loss": self.mean_loss, "seconds": round(self.seconds, 3), "yielded_rounds": self.yielded_rounds,
                "floor_pieces": self.floor_pieces}


@dataclass
class TrainingPolicy:
    """The fast loop: how much training may run in this worker round."""

    latency_target_s: float
    min_share: float = 0.0

    def examples_this_round(
        self, queued: int, running_rows: int, decode_step_s: float, example_s: float | None, remaining: int
    ) -> int:
        """Examples that fit in this round's latency target (0: yield this round). `example_s` is the
        measured time per training example (None before the first), `remaining` what is left of the step."""
        if queued > 0:
            return 0  # waiting requests are admitted first; training resumes once they run
        if running_rows == 0:
            return remaining  # nobody waits on this round: finish the step
        if example_s is None:
            return 1  # measure with the smallest piece before trusting the target
        fitting = int((self.latency_target_s - decode_step_s) / max(example_s, 1e-9))
        return max(0, min(remaining, fitting))

    def owed_a_piece(self, example_s: float | None, since_trained_s: float) -> bool:
        """When nothing fits: whether training has waited long enough that one example now keeps its share of
        the worker's time at min_share (a piece of example_s after a wait of example_s * (1 - share) / share;
        before any piece was measured, the latency target stands in for example_s)."""
        if self.min_share <= 0:
            return False
        piece_s = example_s if example_s is not None else self.latency_target_s
        return since_trained_s >= piece_s * (1 - self.min_share) / self.min_share


Encoded = tuple[list[int], list[int], float]  # input ids, labels, weight


@dataclass
class TrainingRun:
    """A training job's progress inside the worker."""

    spec: TrainSpec
    encoded: list[Encoded]
    policy: TrainingPolicy
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    rng: random.Random
    started: float = field(default_factory=time.perf_counter)
    losses: list[float] = field(default_factory=list)
    yielded_rounds: int = 0
    floor_pieces: int = 0
    last_piece_end: float | None = None  # perf_counter when training last ran
    example_s: float | None = None  # measured time per example through forward and backward
    _order: list[int] = field(default_factory=list)
    # The optimizer step in progress: examples not yet through backward, its total weight, its loss so far.
    pending: list[Encoded] = field(default_factory=list)
    step_weight: float = 0.0
    step_loss: float = 0.0

    @property
    def done(self) -> bool:
        return len(self.losses) >= self.spec.steps

    def next_batch(self) -> list[Encoded]:
        batch: list[Encoded] = []
        while len(batch) < min(self.spec.batch_size, len(self.encoded)):
            if not self._order:
                self._order = list(range(len(self.encoded)))
                self.rng.shuffle(self._order)
            batch.append(self.encoded[self._order.pop()])
        return batch

    def since_trained_s(self, now: float) -> float:
        return now - (self.last_piece_end if self.last_piece_end is not None else self.started)

    @property
    def remaining_in_step(self) -> int:
        return len(self.pending) if self.pending else min(self.spec.batch_size, len(self.encoded))

    def take_piece(self, count: int) -> tuple[list[Encoded], float]:
        """The next `count` examples of the current step (starting a new step if none is in progress) and
        the step's total weight, which every piece's loss is divided by."""
        if not self.pending:
            self.pending = self.next_batch()
            self.step_weight = sum(w for _, _, w in self.pending)
            self.step_loss = 0.0
        piece, self.pending = self.pending[:count], self.pending[count:]
        return piece, self.step_weight

    def piece_done(self, loss: float, examples: int, seconds: float) -> bool:
        """Account for a piece that went through backward; True when the step's last piece did."""
        self.step_loss += loss
        self.last_piece_end = time.perf_counter()
        per_example = seconds / max(1, examples)
        # Smoothed: one slow piece (a long example, a busy core) should not stop training for long.
        self.example_s = per_example if self.example_s is None else 0.7 * self.example_s + 0.3 * per_example
        return not self.pending

    def step_done(self) -> None:
        self.losses.append(self.step_loss)

    def report(self) -> TrainReport:
        losses = self.losses or [float("nan")]
        return TrainReport(len(self.losses), losses[0], losses[-1], sum(losses) / len(losses),
                           time.perf_counter() - self.started, self.yielded_rounds, self.floor_pieces)

    def status(self) -> dict[str, Any]:
        return {"shadow": self.spec.shadow_id, "live": self.spec.live_id, "steps_done": len(self.losses),
                "steps": self.spec.steps, "last_loss": self.losses[-1] if self.losses else None,
                "yielded_rounds": self.yielded_rounds, "floor_pieces": self.floor_pieces}


def encode_example(
    prompt_ids: list[int], answer_ids: list[int], eos_id: int | None, max_tokens: int
) -> tuple[list[int], list[int]]:
    """Input ids and labels: the loss falls on the answer (and the end-of-turn token) only. A long prompt is
    cut from the left so that the answer always stays."""
    answer = answer_ids + ([eos_id] if eos_id is not None else [])
    answer = answer[: max_tokens - 1]
    prompt = prompt_ids[-(max_tokens - len(answer)) :]
    return prompt + answer, [IGNORE] * len(prompt) + answer


def collate(
    batch: Sequence[Encoded], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask, labels and per-row weights."""
    width = max(len(ids) for ids, _, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (row_ids, row_labels, _) in enumerate(batch):
        ids[row, : len(row_ids)] = torch.tensor(row_ids)
        labels[row, : len(row_labels)] = torch.tensor(row_labels)
        mask[row, : len(row_ids)] = 1
    weights = torch.tensor([w for _, _, w in batch], dtype=torch.float32)
    return ids.to(device), mask.to(device), labels.to(device), weights.to(device)


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """(rows, length) bool: the positions whose next token is labelled. Only these need logits: the
    vocabulary projection of the prompt tokens would be a fifth of the step's work for nothing."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE
    return keep


def row_losses(answer_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's mean token loss on its labelled tokens (answer_logits as in weighted_loss)."""
    keep = answer_positions(labels)
    targets = labels[:, 1:][keep[:, :-1]]
    rows = keep.nonzero()[:, 0]
    per_token = torch.nn.functional.cross_entropy(answer_logits.float(), targets, reduction="none")
    counts = keep.sum(dim=1).clamp(min=1).to(per_token.dtype)
    per_row = torch.zeros(labels.shape[0], dtype=per_token.dtype, device=per_token.device)
    return per_row.index_add(0, rows, per_token) / counts


def weighted_loss(
    answer_logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, total_weight: float | None = None
) -> torch.Tensor:
    """Each row's mean token loss, weighted: (1 - alpha) own data and alpha distilled answers mix this way.
    answer_logits are the logits at answer_positions(labels), flattened in row order.
    Divided by total_weight (the whole step's, when the step runs in pieces) or else by these rows' weight."""
    per_row = row_losses(answer_logits, labels)
    total = weights.sum() if total_weight is None else torch.tensor(total_weight, device=weights.device)
    return (per_row * weights).sum() / total.clamp(min=1e-8)
