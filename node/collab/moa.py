"""Mixture of agents, without I/O: who to ask, what each layer's prompt says, and who answered.

A round: the origin picks K peers; in each of M proposer layers it and the peers answer a prompt that carries
the previous layer's answers (numbered); the origin then aggregates the last layer's answers into one. An
answer that misses its layer's deadline is left out; a peer that fails is replaced by a spare if one is left.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

MIN_REPUTATION = 0.4
MAX_ANSWER_CHARS_IN_PROMPT = 2000
UNREACHABLE_COOLDOWN_S = 60.0


@dataclass(frozen=True)
class Candidate:
    """A peer that could take part, as the ledger describes it."""

    peer_id: str
    models: tuple[str, ...]
    queue_length: int
    reputation: float
    mean_service_time_s: float = 0.0
    connected: bool = True  # False: known from the ledger only, asking it costs a dial


@dataclass
class ReachMemory:
    """Peers that could not be reached lately: left out for a while, so a peer that died (its profile lives on
    in the ledger until it expires) does not cost every round a failed dial."""

    cooldown_s: float = UNREACHABLE_COOLDOWN_S
    _until: dict[str, float] = field(default_factory=dict)

    def failed(self, peer_id: str, now: float) -> None:
        self._until[peer_id] = now + self.cooldown_s

    def reached(self, peer_id: str) -> None:
        self._until.pop(peer_id, None)

    def blocked(self, peer_id: str, now: float) -> bool:
        until = self._until.get(peer_id)
        if until is not None and now >= until:
            del self._until[peer_id]
            return False
        return until is not None


def select_peers(
    candidates: Iterable[Candidate],
    k: int,
    rng: random.Random,
    *,
    model: str | None = None,
    exclude: Iterable[str] = (),
    min_reputation: float = MIN_REPUTATION,
) -> list[Candidate]:
    """Up to k peers serving a model (`model` if given), reputation at least `min_reputation`, lowest load
    first, better reputation next, then connected ones (no dial), random among equals. The rest, in the same
    order, are the spares."""
    excluded = set(exclude)
    eligible = [
        c for c in candidates
        if c.peer_id not in excluded and c.models and (model is None or model in c.models)
        and c.reputation >= min_reputation
    ]
    # Shuffle first: the sort is stable, so equals keep a random order.
    rng.shuffle(eligible)
    eligible.sort(key=lambda c: (c.queue_length, -round(c.reputation, 2), not c.connected))
    return eligible[:k] if k >= 0 else eligible


def rank_peers(candidates: Iterable[Candidate], rng: random.Random, **kwargs: Any) -> list[Candidate]:
    """Every eligible peer in selection order (first K ask, the others are spares)."""
    return select_peers(candidates, -1, rng, **kwargs)


def _clip(text: str) -> str:
    text = text.strip()
    return text if len(text) <= MAX_ANSWER_CHARS_IN_PROMPT else text[:MAX_ANSWER_CHARS_IN_PROMPT] + " [...]"


def numbered(answers: Sequence[str]) -> str:
    return "\n\n".join(f"{i}. {_clip(a)}" for i, a in enumerate(answers, 1))


def layer_messages(question: Sequence[dict[str, str]], previous: Sequence[str]) -> list[dict[str, str]]:
    """The messages a proposer in a layer answers: the question, plus the previous layer's answers."""
    messages = [dict(m) for m in question]
    if not previous:
        return messages
    hint = (
        "Other assistants answered this question as follows:\n\n" + numbered(previous)
        + "\n\nUse them as references (they may be wrong) and give your own best answer."
    )
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    if last_user is None:
        messages.append({"role": "user", "content": hint})
    else:
        messages[last_user] = {**messages[last_user], "content": messages[last_user]["content"] + "\n\n" + hint}
    return messages


def aggregate_messages(question: Sequence[dict[str, str]], answers: Sequence[str]) -> list[dict[str, str]]:
    """The origin's final prompt: synthesise one answer from the last layer's."""
    system = {
        "role": "system",
        "content": "You are given several answers to the user's question. Critically evaluate them and "
        "write one correct, concise answer. Do not mention the other answers.",
    }
    return [system, *layer_messages([m for m in question if m.get("role") != "system"], answers)]


@dataclass
class Contribution:
    peer_id: str
    layer: int
    text: str
    model: str
    elapsed_s: float


@dataclass
class Miss:
    peer_id: str
    layer: int
    reason: str  # "deadline", or the error


@dataclass
class RoundState:
    """The bookkeeping of one round: which peer is asked in which layer, answers, misses, spares."""

    origin: str
    k: int
    m: int
    peers: list[str]
    spares: list[str]
    contributions: list[Contribution] = field(default_factory=list)
    misses: list[Miss] = field(default_factory=list)
    replaced: dict[str, str] = field(default_factory=dict)  # failed peer -> its replacement
    round_id: str = ""

    def answers(self, layer: int) -> list[str]:
        return [c.text for c in self.contributions if c.layer == layer and c.text.strip()]

    def previous_answers(self, layer: int) -> list[str]:
        """What a layer's prompt carries: the nearest earlier layer that produced any answers."""
        for earlier in range(layer - 1, -1, -1):
            found = self.answers(earlier)
            if found:
                return found
        return []

    def record_answer(self, layer: int, peer_id: str, text: str, model: str, elapsed_s: float) -> None:
        self.contributions.append(Contribution(peer_id, layer, text, model, elapsed_s))

    def record_miss(self, layer: int, peer_id: str, reason: str) -> None:
        self.misses.append(Miss(peer_id, layer, reason))

    def replace(self, failed: str) -> str | None:
        """A failed peer leaves the round; a spare (if any) takes its place from now on."""
        if failed in self.peers:
            self.peers.remove(failed)
        if not self.spares:
            return None
        spare = self.spares.pop(0)
        self.peers.append(spare)
        self.replaced[failed] = spare
        return spare

    def contributors(self) -> list[str]:
        """Peers with at least one answer used, in first-answer order (the origin included)."""
        seen: dict[str, None] = {}
        for c in self.contributions:
            seen.setdefault(c.peer_id, None)
        return list(seen)

    def summary(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "m": self.m,
            "contributors": self.contributors(),
            "contributions": [
                {"peer_id": c.peer_id, "layer": c.layer, "model": c.model, "elapsed_s": round(c.elapsed_s, 3)}
                for c in self.contributions
            ],
            "missed": [{"peer_id": x.peer_id, "layer": x.layer, "reason": x.reason} for x in self.misses],
            "replaced": dict(self.replaced),
        }
