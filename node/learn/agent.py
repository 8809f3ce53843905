"""What one learning node does with its own engine: evaluate an adapter on its validation split, answer a
transfer set as a teacher, and train a shadow copy of its live adapter, keeping it only if it validates
better. Shared by the daemon's learning service and by bench/distill.py."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import trio

from knexa.node.engine import (
    Engine,
    EngineOverloaded,
    GenerationRequest,
    SamplingParams,
    TrainExample,
    TrainReport,
    TrainSpec,
)
from knexa.node.learn.tasks import GENERAL, Example, category_of, grade, majority, skill_scores

EVAL_MAX_TOKENS = 16
EVAL_CONCURRENCY = 8
OVERLOAD_WAIT_S = 300.0
# KNEXA-FL's teacher sampling.
TEACHER_SAMPLING = {"temperature": 0.8, "top_p": 0.9, "top_k": 50}


def user_turn(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


@dataclass(frozen=True)
class Evaluation:
    accuracy: float
    skills: dict[str, float]
    results: tuple[tuple[Example, bool], ...]
    loss: float | None  # the mean over examples of each answer's mean token loss (nats); None if not measured
    losses: tuple[float, ...] = ()  # each example's, in the order of `results`


@dataclass(frozen=True)
class TrainOutcome:
    before: Evaluation  # the live adapter's, before training
    after: Evaluation  # the shadow's
    swapped: bool
    report: TrainReport

    @property
    def live(self) -> Evaluation:
        """The live adapter's evaluation after the call: the shadow's if it was promoted."""
        return self.after if self.swapped else self.before

    @property
    def accuracy_before(self) -> float:
        return self.before.accuracy

    @property
    def accuracy_after(self) -> float:
        return self.after.accuracy

    @property
    def skills(self) -> dict[str, float]:
        return self.live.skills

    @property
    def gain(self) -> float:
        return self.accuracy_after - self.accuracy_before

    @property
    def loss_drop(self) -> float:
        """How much the shadow lowered the validation loss: what the student reports as its reward. A
        validation split of a few dozen answers moves accuracy in steps of 2-5 points, mostly noise; the loss
        on the same answers moves with every token the teacher's answers taught."""
        if self.before.loss is None or self.after.loss is None:
            raise ValueError("both evaluations must measure the loss")
        return self.before.loss - self.after.loss

    def to_dict(self) -> dict[str, Any]:
        return {"accuracy_before": self.accuracy_before, "accuracy_after": self.accuracy_after,
                "gain": self.gain, "loss_before": self.before.loss, "loss_after": self.after.loss,
                "loss_drop": self.loss_drop, "swapped": self.swapped, "training": self.report.to_dict(),
                "skills": self.skills}


async def _generate(engine: Engine, request: GenerationRequest) -> str:
    """One generation; a full engine queue is waited out for a while rather than failed (evaluation is
    background work), then the overload is raised."""
    with trio.move_on_after(OVERLOAD_WAIT_S):
        while True:
            try:
                return (await engine.generate(request)).text
            except EngineOverloaded:
                await trio.sleep(0.05)
    raise EngineOverloaded(f"the engine's queue stayed full for {OVERLOAD_WAIT_S:.0f}s")


async def _map_generate(engine: Engine, requests: Sequence[GenerationRequest], concurrency: int) -> list[str]:
    outputs: list[str] = [""] * len(requests)
    limit = trio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with limit:
            outputs[i] = await _generate(engine, requests[i])

    async with trio.open_nursery() as nursery:
        for i in range(len(requests)):
            nursery.start_soon(one, i)
    return outputs


async def evaluate(engine: Engine, adapter: str | None, examples: Sequence[Example],
                   max_tokens: int = EVAL_MAX_TOKENS, concurrency: int = EVAL_CONCURRENCY,
                   with_loss: bool = True) -> Evaluation:
    """Greedy answers, graded (accuracy overall and per category), and the loss on the reference answers
    (unless with_loss is False: a test set whose loss nothing reads)."""
    params = SamplingParams(max_new_tokens=max_tokens)
    requests = [GenerationRequest(messages=user_turn(e.prompt), params=params, adapter=adapter) for e in examples]
    outputs = await _map_generate(engine, requests, concurrency)
    results = tuple((e, grade(e, out)) for e, out in zip(examples, outputs, strict=True))
    accuracy = sum(ok for _, ok in results) / len(results) if results else 0.0
    if not with_loss:
        return Evaluation(accuracy, skill_scores(results), results, None)
    losses = await engine.answer_loss([TrainExample(user_turn(e.prompt), e.answer) for e in examples],
                                      adapter=adapter)
    return Evaluation(accuracy, skill_scores(results), results, sum(losses) / len(losses) if losses else 0.0,
                      tuple(losses))


# Seeds of a prompt's further samples, far from the next prompts' first ones.
VOTE_SEED_STRIDE = 100_003


async def teacher_answers(engine: Engine, adapter: str | None, prompts: Sequence[str], max_tokens: int,
                          seed: int, concurrency: int = EVAL_CONCURRENCY, votes: int = 1) -> list[str]:
    """The teacher's answers to the public transfer set, sampled as KNEXA-FL samples them. With votes > 1, each
    prompt of the task family is sampled that many times and answered only where most samples agree (else "",
    which a student does not learn): a small teacher's agreed answers are right more often than one sample
    (0.30 against 0.19 in bench/distill_pairs.py). Other prompts have no answer to compare, and get one sample."""
    if votes < 1:
        raise ValueError("votes must be at least 1")
    # Each answer gets what the model's context leaves, up to max_tokens (a small model's context can be
    # shorter than the brief's 256 answer tokens); a prompt that fills it alone gets no answer.
    budgets = [min(max_tokens, engine.room_for_answer(user_turn(p))) for p in prompts]
    wanted = [(i, vote) for i, (p, budget) in enumerate(zip(prompts, budgets, strict=True)) if budget > 0
              for vote in range(votes if category_of(p) != GENERAL else 1)]
    requests = [
        GenerationRequest(messages=user_turn(prompts[i]), adapter=adapter,
                          params=SamplingParams(max_new_tokens=budgets[i], seed=seed + i + vote * VOTE_SEED_STRIDE,
                                                **TEACHER_SAMPLING))
        for i, vote in wanted
    ]
    samples: list[list[str]] = [[] for _ in prompts]
    for (i, _), output in zip(wanted, await _map_generate(engine, requests, concurrency), strict=True):
        samples[i].append(output.strip())
    return [(majority(s) or "") if len(s) > 1 else (s[0] if s else "") for s in samples]


def mixed_examples(own: Sequence[Example], distilled: Sequence[tuple[str, str]], alpha: float) -> list[TrainExample]:
    """(1 - alpha) of the loss on the node's own data, alpha on the teacher's answers (each side's weight
    shared among its examples, so the mix holds whatever the counts)."""
    examples = [TrainExample(user_turn(e.prompt), e.answer, (1 - alpha) / max(1, len(own))) for e in own]
    answered = [(p, a) for p, a in distilled if a.strip()]
    examples += [TrainExample(user_turn(p), a, alpha / max(1, len(answered))) for p, a in answered]
    return [e for e in examples if e.weight > 0]


def improves(gain: float, loss_drop: float | None) -> bool:
    """The promotion rule, on a training's validation accuracy gain and loss drop: a gain or, with none either
    way, a drop. A validation split of a few dozen examples ties often, and a tie says nothing; the loss still
    does (in bench/distill_pairs.py's 120 measured pairs the tiebreak decided 9 and its choice tested better
    in 7)."""
    if gain != 0:
        return gain > 0
    return loss_drop is not None and loss_drop > 0


def validates_better(after: Evaluation, before: Evaluation) -> bool:
    """Higher validation accuracy or, at the same accuracy, a lower loss on the reference answers."""
    drop = before.loss - after.loss if before.loss is not None and after.loss is not None else None
    return improves(after.accuracy - before.accuracy, drop)


def shadow_of(live_id: str) -> str:
    return f"{live_id}-shadow"


async def train_and_keep_if_better(
    engine: Engine,
    live_id: str,
    examples: Sequence[TrainExample],
    validation: Sequence[Example],
    *,
    steps: int,
    before: Evaluation | None = None,
    lr: float = 3e-4,
    batch_size: int = 4,
    latency_target_s: float = 0.5,
    min_share: float = TrainSpec.min_share,
    seed: int = 0,
    concurrency: int = EVAL_CONCURRENCY,
) -> TrainOutcome:
    """Train a shadow of the live adapter; it replaces the live one only if it validates better
    (`validates_better`)."""
    shadow_id = shadow_of(live_id)
    await engine.ensure_adapter(live_id, seed=seed)
    if before is None:
        before = await evaluate(engine, live_id, validation, concurrency=concurrency)
    report = await engine.train_shadow(TrainSpec(
        live_id=live_id, shadow_id=shadow_id, examples=list(examples), steps=steps, lr=lr,
        batch_size=batch_size, latency_target_s=latency_target_s, min_share=min_share, seed=seed,
    ))
    after = await evaluate(engine, shadow_id, validation, concurrency=concurrency)
    swapped = validates_better(after, before)
    if swapped:
        await engine.promote_shadow(shadow_id, live_id)
    return TrainOutcome(before, after, swapped, report)
