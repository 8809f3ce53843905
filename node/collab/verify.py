"""Verification of a peer's answer, without I/O: which answers to check, and whether a check passed.

A check re-scores prompt + claimed answer with the node's own copy of the model in one forward pass (the
engine's `score`) and compares each claimed token with the node's own distribution: for a greedy request the
claimed token must be the argmax (or within a small log-probability margin of it: float rounding on other
hardware can swap near-ties); for a sampled request its log-probability must stay above a floor. One pass
replaces the N sequential decode steps the peer ran, so a check costs a fraction of the generation.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class VerifyPolicy:
    fraction: float = 0.1  # share of eligible answers checked
    greedy_margin: float = 0.05  # nats below the argmax a claimed greedy token may be (near-ties)
    sampled_floor: float = -12.0  # log-probability under which a sampled token is implausible
    max_bad_fraction_sampled: float = 0.05  # sampled answers: this share of implausible tokens is tolerated

    def __post_init__(self) -> None:
        if not 0 <= self.fraction <= 1:
            raise ValueError("verify fraction must be in [0, 1]")


def model_fingerprint(identity: Mapping[str, Any]) -> str:
    """What two nodes must share for one to check the other's tokens: the weights, the tokenizer and the dtype
    they run in (from the engine's ModelIdentity). A name says none of these: a fine-tuned copy keeps it,
    and two CPUs may pick different dtypes for the same model."""
    return f"{identity['weights_sha256'][:16]}-{identity['tokenizer_sha256'][:16]}-{identity['dtype']}"


def should_check(policy: VerifyPolicy, rng: random.Random, own_model: str | None, claimed_model: str) -> bool:
    """Check only answers from a model this node also serves (same fingerprint: weights, tokenizer, dtype),
    and then a `fraction` of them."""
    if not own_model or own_model != claimed_model or policy.fraction <= 0:
        return False
    return policy.fraction >= 1 or rng.random() < policy.fraction


@dataclass(frozen=True)
class Verdict:
    passed: bool
    checked_tokens: int
    bad_tokens: int
    first_bad: int | None
    reason: str


def judge(
    policy: VerifyPolicy,
    *,
    greedy: bool,
    claimed_token_ids: Sequence[int],
    scored_token_ids: Sequence[int],
    logprobs: Sequence[float],
    argmax_token_ids: Sequence[int],
    argmax_logprobs: Sequence[float],
) -> Verdict:
    """Compare the claimed tokens with the verifier's per-position scores of them."""
    n = len(claimed_token_ids)
    if n == 0:
        return Verdict(False, 0, 0, None, "the answer claims no tokens")
    if list(scored_token_ids) != list(claimed_token_ids) or not (
        len(logprobs) == len(argmax_token_ids) == len(argmax_logprobs) == n
    ):
        return Verdict(False, n, n, 0, "the scores do not cover the claimed tokens")
    bad: list[int] = []
    for i in range(n):
        if greedy:
            ok = claimed_token_ids[i] == argmax_token_ids[i] or argmax_logprobs[i] - logprobs[i] <= policy.greedy_margin
        else:
            ok = logprobs[i] >= policy.sampled_floor
        if not ok:
            bad.append(i)
    if greedy:
        passed = not bad
        rule = "greedy tokens must be the verifier's argmax"
    else:
        passed = len(bad) <= policy.max_bad_fraction_sampled * n
        rule = f"sampled tokens must have log-probability >= {policy.sampled_floor}"
    if passed:
        return Verdict(True, n, len(bad), bad[0] if bad else None, "ok")
    return Verdict(False, n, len(bad), bad[0], f"{len(bad)} of {n} tokens fail ({rule}); first at {bad[0]}")


@dataclass
class PeerTally:
    """One verifier's running record of one peer; the reputation report it writes is passed / checked."""

    checked: int = 0
    failed: int = 0

    def add(self, passed: bool) -> None:
        self.checked += 1
        self.failed += not passed

    @property
    def score(self) -> float:
        return (self.checked - self.failed) / self.checked if self.checked else 0.5
