"""Beacon task allocation and weighted voting, without I/O.

A task beacon carries a requirement vector r(t); each node answers with its self-score s_j = cos(c_j, r(t))
(c_j its skill vector) and its load. The best-scoring nodes execute; answers with a discrete final result are
combined by a vote weighted by the executors' scores, and the argmax wins.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

MIN_WEIGHT = 1e-3  # a node with no declared skills still counts, barely: it breaks ties between no-one
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def cosine(skills: Mapping[str, float], requirement: Mapping[str, float]) -> float:
    """cos(c, r) over the union of categories; 0 when either vector is empty or zero."""
    dot = sum(float(v) * float(requirement.get(k, 0.0)) for k, v in skills.items())
    norm = math.sqrt(sum(float(v) ** 2 for v in skills.values())) * math.sqrt(
        sum(float(v) ** 2 for v in requirement.values())
    )
    if norm <= 0 or not math.isfinite(norm):
        return 0.0
    return max(-1.0, min(1.0, dot / norm))


def parse_requirement(text: str) -> dict[str, float]:
    """`"math=1,reasoning=0.5"` as a requirement vector; ValueError with the reason on bad input."""
    vector: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"expected category=weight, got {part!r}")
        try:
            weight = float(value)
        except ValueError:
            raise ValueError(f"weight of {name.strip()!r} is not a number: {value!r}") from None
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weight of {name.strip()!r} must be a non-negative number")
        vector[name.strip()] = weight
    return vector


@dataclass(frozen=True)
class Bid:
    peer_id: str
    score: float
    queue_length: int


def choose_executors(bids: Iterable[Bid], n: int) -> list[Bid]:
    """The n best bids: highest score, then shortest queue, then peer id (deterministic)."""
    return sorted(bids, key=lambda b: (-b.score, b.queue_length, b.peer_id))[: max(n, 0)]


def final_answer(text: str) -> str | None:
    """The discrete result of an answer: its last number if it has one, else its last line, normalised."""
    numbers = _NUMBER.findall(text)
    if numbers:
        value = numbers[-1].replace(",", "")
        try:
            number = float(value)
        except ValueError:
            return None
        return str(int(number)) if number.is_integer() else repr(number)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return None
    normal = re.sub(r"[^\w\s]", "", lines[-1].lower())
    normal = " ".join(normal.split())
    return normal[:200] or None


@dataclass(frozen=True)
class Ballot:
    peer_id: str
    answer: str | None
    weight: float


@dataclass(frozen=True)
class VoteOutcome:
    answer: str | None
    totals: dict[str, float]
    supporters: list[str]


def weighted_vote(ballots: Iterable[Ballot]) -> VoteOutcome:
    """argmax over answers of the summed weights of their voters; ties go to more voters, then the answer
    that sorts first, so every node computes the same winner from the same ballots."""
    totals: dict[str, float] = {}
    voters: dict[str, list[str]] = {}
    for ballot in ballots:
        if ballot.answer is None:
            continue
        totals[ballot.answer] = totals.get(ballot.answer, 0.0) + max(ballot.weight, MIN_WEIGHT)
        voters.setdefault(ballot.answer, []).append(ballot.peer_id)
    if not totals:
        return VoteOutcome(None, {}, [])
    winner = min(totals, key=lambda a: (-round(totals[a], 9), -len(voters[a]), a))
    return VoteOutcome(winner, totals, voters[winner])
