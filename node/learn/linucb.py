"""The matchmaker's learner: LinUCB over pair contexts, and greedy disjoint teacher/student pairing.

Pure code (numpy). The state is two arrays, A (d x d) and b (d); it serialises to plain lists so that it can
live in a signed ledger entry and any node can continue from it.

A pair's context is the two profile vectors concatenated, and after them the teacher's per-category lead over
the student. A linear score of the concatenation alone is a teacher term plus a student term: it can rank good
teachers and needy students, never a teacher that is good where this student is weak, which is what a
distillation gain comes from (the student learns only answers in categories its teacher validated better in).
The bandit starts from a prior mean that credits that lead (ridge regression towards it rather than towards
zero); the rewards move it from there.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from knexa.node.learn.tasks import CATEGORIES

DEFAULT_LAMBDA = 0.01
# The rewards are z-scores and a mesh runs tens of rounds, not thousands: with lambda = 0.01 a width of
# beta0 = 1 is ten standard deviations in every direction not yet tried, so that the bandit would do little
# but explore for as long as a mesh runs.
DEFAULT_BETA0 = 0.1
MAX_DIM = 64
# Students that all train again from the same live adapter report drops a few hundredths of a nat apart; divided
# by a deviation that small, those differences would become rewards of +-3. Below this, a unit of reward is this.
MIN_DEVIATION = 0.05


@dataclass(frozen=True)
class PairScore:
    mean: float
    width: float

    @property
    def ucb(self) -> float:
        return self.mean + self.width


class LinUCB:
    def __init__(self, dim: int, lam: float = DEFAULT_LAMBDA, beta0: float = DEFAULT_BETA0,
                 prior_mean: Sequence[float] | np.ndarray | None = None) -> None:
        if not 0 < dim <= MAX_DIM:
            raise ValueError(f"dimension must be 1..{MAX_DIM}")
        if not (lam > 0 and math.isfinite(lam)) or not (beta0 >= 0 and math.isfinite(beta0)):
            raise ValueError("lambda must be positive and beta0 non-negative")
        self.dim, self.lam, self.beta0 = dim, lam, beta0
        self.A = lam * np.eye(dim)
        # theta = A^-1 b starts at the prior mean, and regularisation pulls towards it instead of towards zero.
        self.b = lam * self._vector(prior_mean) if prior_mean is not None else np.zeros(dim)
        self.updates = 0

    def beta(self, round_no: int) -> float:
        return self.beta0 / math.sqrt(max(1, round_no))

    def theta(self) -> np.ndarray:
        return np.linalg.solve(self.A, self.b)

    def score(self, x: Sequence[float] | np.ndarray, round_no: int) -> PairScore:
        x = self._vector(x)
        mean = float(self.theta() @ x)
        width = self.beta(round_no) * math.sqrt(max(0.0, float(x @ np.linalg.solve(self.A, x))))
        return PairScore(mean, width)

    def update(self, x: Sequence[float] | np.ndarray, reward: float) -> None:
        x = self._vector(x)
        if not math.isfinite(reward):
            raise ValueError("reward must be finite")
        self.A += np.outer(x, x)
        self.b += reward * x
        self.updates += 1

    def _vector(self, x: Sequence[float] | np.ndarray) -> np.ndarray:
        v = np.asarray(x, dtype=float)
        if v.shape != (self.dim,) or not np.all(np.isfinite(v)):
            raise ValueError(f"context must be {self.dim} finite numbers")
        return v

    def to_dict(self) -> dict[str, Any]:
        return {
            "dim": self.dim, "lambda": self.lam, "beta0": self.beta0, "updates": self.updates,
            "A": [float(v) for v in self.A.ravel()], "b": [float(v) for v in self.b],
        }

    @classmethod
    def from_dict(cls, raw: Any) -> LinUCB:
        if not isinstance(raw, Mapping):
            raise ValueError("bandit state must be a map")
        try:
            dim, lam, beta0, updates = int(raw["dim"]), float(raw["lambda"]), float(raw["beta0"]), int(raw["updates"])
            a, b = raw["A"], raw["b"]
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"bandit state: {exc}") from None
        bandit = cls(dim, lam, beta0)
        if not isinstance(a, list | tuple) or not isinstance(b, list | tuple) or len(a) != dim * dim or len(b) != dim:
            raise ValueError("bandit state: A and b do not match the dimension")
        try:
            A = np.asarray(a, dtype=float).reshape(dim, dim)
            B = np.asarray(b, dtype=float)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"bandit state: {exc}") from None
        if not (np.all(np.isfinite(A)) and np.all(np.isfinite(B))) or updates < 0:
            raise ValueError("bandit state: values must be finite")
        # A = lambda*I + sum x x^T is symmetric positive definite; anything else cannot come from updates.
        if not np.allclose(A, A.T) or np.linalg.eigvalsh(A).min() <= 0:
            raise ValueError("bandit state: A is not symmetric positive definite")
        bandit.A, bandit.b, bandit.updates = A, B, updates
        return bandit


def profile_vector(
    skills: Mapping[str, float], accuracy: float, categories: Sequence[str] = CATEGORIES
) -> np.ndarray:
    """What a node is, for the matchmaker: its per-category skill, its overall accuracy and a bias term."""
    return np.array([float(skills.get(c, 0.0)) for c in categories] + [float(accuracy), 1.0])


def node_dim(categories: Sequence[str] = CATEGORIES) -> int:
    return len(categories) + 2


def pair_dim(categories: Sequence[str] = CATEGORIES) -> int:
    return 2 * node_dim(categories) + len(categories)


def _lead(teacher: np.ndarray, student: np.ndarray) -> np.ndarray:
    skills = len(teacher) - 2
    return np.maximum(0.0, teacher[:skills] - student[:skills])


def pair_context(teacher: np.ndarray, student: np.ndarray) -> np.ndarray:
    """Teacher profile, student profile, then the teacher's lead over the student in each category."""
    return np.concatenate([teacher, student, _lead(teacher, student)])


def round_relative(contexts: Sequence[Sequence[float]], categories: Sequence[str] = CATEGORIES) -> list[np.ndarray]:
    """The contexts of one round's pairs less their mean, bias terms kept: what the bandit learns from when
    the round's rewards are measured against the round's own mean reward.

    Rewards relative to their round carry no level, so contexts must not either: fed whole, every pair the
    prior ranks first (a large lead, hence a large predicted reward) would earn a mean reward of zero, and each
    round would pull the bandit off the lead whatever order the rewards put the pairs in."""
    x = np.asarray(contexts, dtype=float)
    if x.ndim != 2 or x.shape[1] != pair_dim(categories):
        raise ValueError(f"contexts must be rows of {pair_dim(categories)} numbers")
    relative = x - x.mean(axis=0)
    bias = [node_dim(categories) - 1, 2 * node_dim(categories) - 1]
    relative[:, bias] = x[:, bias]
    return list(relative)


def teacher_lead(teacher: np.ndarray, student: np.ndarray, categories: Sequence[str] = CATEGORIES
                 ) -> dict[str, float]:
    """The categories where the teacher validated better than the student, and by how much."""
    return {c: float(v) for c, v in zip(categories, _lead(teacher, student), strict=True) if v > 0}


def lead_prior(categories: Sequence[str] = CATEGORIES) -> np.ndarray:
    """The prior mean: one z-score of reward per unit of the teacher's per-category lead, nothing else."""
    return np.concatenate([np.zeros(2 * node_dim(categories)), np.ones(len(categories))])


def new_bandit(categories: Sequence[str] = CATEGORIES, beta0: float = DEFAULT_BETA0) -> LinUCB:
    return LinUCB(pair_dim(categories), beta0=beta0, prior_mean=lead_prior(categories))


@dataclass(frozen=True)
class Candidate:
    peer_id: str
    vector: np.ndarray
    performance: float


@dataclass(frozen=True)
class PairChoice:
    teacher: str
    student: str
    context: tuple[float, ...]
    mean: float
    width: float

    @property
    def ucb(self) -> float:
        return self.mean + self.width

    def to_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher, "student": self.student, "context": list(self.context),
                "mean": self.mean, "width": self.width}

    @classmethod
    def from_dict(cls, raw: Any) -> PairChoice:
        if not isinstance(raw, Mapping):
            raise ValueError("pair must be a map")
        try:
            teacher, student = raw["teacher"], raw["student"]
            context = tuple(float(v) for v in raw["context"])
            mean, width = float(raw["mean"]), float(raw["width"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"pair: {exc}") from None
        if not isinstance(teacher, str) or not isinstance(student, str) or not teacher or teacher == student:
            raise ValueError("pair: teacher and student must be two different peer ids")
        if len(context) > 2 * MAX_DIM or not all(math.isfinite(v) for v in (*context, mean, width)):
            raise ValueError("pair: numbers must be finite")
        return cls(teacher, student, context, mean, width)


def oriented(a: Candidate, b: Candidate) -> tuple[Candidate, Candidate]:
    """(teacher, student): the better performer teaches; a tie goes to the smaller peer id."""
    if (b.performance, a.peer_id) > (a.performance, b.peer_id):
        return b, a
    return a, b


def plan_pairs(candidates: Sequence[Candidate], bandit: LinUCB, round_no: int) -> list[PairChoice]:
    """Greedy disjoint pairs by upper confidence bound, floor(N/2) of them."""
    scored: list[PairChoice] = []
    ordered = sorted(candidates, key=lambda c: c.peer_id)
    for i, first in enumerate(ordered):
        for second in ordered[i + 1 :]:
            teacher, student = oriented(first, second)
            x = pair_context(teacher.vector, student.vector)
            s = bandit.score(x, round_no)
            scored.append(PairChoice(teacher.peer_id, student.peer_id, tuple(float(v) for v in x), s.mean, s.width))
    # Pairs that score alike (members with the same profile score alike on every pair) are taken in an order
    # drawn from the round, the same at every node: by their ids, the same pairs would be tried every round.
    scored.sort(key=lambda p: (-p.ucb, _tiebreak(round_no, p)))
    return _disjoint(scored, len(candidates) // 2)


def _tiebreak(round_no: int, pair: PairChoice) -> bytes:
    return hashlib.sha256(f"{round_no}/{pair.teacher}/{pair.student}".encode()).digest()


def choice_rejection(pairs: Sequence[PairChoice], bandit: LinUCB, round_no: int,
                     categories: Sequence[str] = CATEGORIES) -> str | None:
    """Why `pairs` are not what `plan_pairs` chooses with this bandit in this round among the members they
    name (each as its pair's context states it), or None. A matchmaker that could pair members as it liked
    would choose who teaches whom; what it can still choose is whom it names and the profiles it states
    for them (each node's view of the members differs for a while, so a plan cannot be held to one)."""
    if not pairs:
        return "plan with no pairs"
    n = node_dim(categories)
    named: list[Candidate] = []
    for pair in pairs:
        x = np.asarray(pair.context, dtype=float)
        if x.shape != (pair_dim(categories),):
            return "pair context of another layout"
        teacher, student = x[:n], x[n:2 * n]
        if teacher[-1] != 1.0 or student[-1] != 1.0 or not np.allclose(x, pair_context(teacher, student),
                                                                          rtol=0.0, atol=1e-12):
            return "pair context that is not two profiles and the teacher's lead"
        t = Candidate(pair.teacher, teacher, float(teacher[-2]))
        s = Candidate(pair.student, student, float(student[-2]))
        if oriented(t, s)[0] is not t:
            return "pair whose teacher is not the better performer"
        score = bandit.score(x, round_no)
        if not (_same_score(score.mean, pair.mean) and _same_score(score.width, pair.width)):
            return "pair scored otherwise than the bandit scores it"
        named += [t, s]
    if _couples(plan_pairs(named, bandit, round_no)) != _couples(pairs):
        return "plan whose pairs are not the bandit's greedy choice"
    return None


def _same_score(x: float, y: float) -> bool:
    return math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12)


def _couples(pairs: Sequence[PairChoice]) -> set[tuple[str, str]]:
    return {(p.teacher, p.student) for p in pairs}


def random_pairs(candidates: Sequence[Candidate], rng: random.Random) -> list[PairChoice]:
    """The baseline: disjoint pairs drawn at random, oriented the same way."""
    pool = sorted(candidates, key=lambda c: c.peer_id)
    rng.shuffle(pool)
    pairs = []
    for first, second in zip(pool[0::2], pool[1::2], strict=False):
        teacher, student = oriented(first, second)
        x = pair_context(teacher.vector, student.vector)
        pairs.append(PairChoice(teacher.peer_id, student.peer_id, tuple(float(v) for v in x), 0.0, 0.0))
    return pairs


def _disjoint(ranked: Sequence[PairChoice], k: int) -> list[PairChoice]:
    used: set[str] = set()
    chosen: list[PairChoice] = []
    for pair in ranked:
        if len(chosen) == k:
            break
        if pair.teacher in used or pair.student in used:
            continue
        used.update((pair.teacher, pair.student))
        chosen.append(pair)
    return chosen


class RewardScaler:
    """Running mean and deviation of the students' measurements (Welford): a reward is a measurement less a
    baseline (by default the running mean), in units of the running deviation."""

    def __init__(self, count: int = 0, mean: float = 0.0, m2: float = 0.0) -> None:
        self.count, self.mean, self.m2 = count, mean, m2

    def z(self, value: float, baseline: float | None = None) -> float | None:
        """The reward; None when there is nothing yet to compare with (no baseline given and fewer than two
        measurements seen): then a measurement can only set the scale."""
        centred = value - (self.mean if baseline is None else baseline)
        if self.count < 2:
            return None if baseline is None else max(-3.0, min(3.0, centred))
        std = max(MIN_DEVIATION, math.sqrt(self.m2 / (self.count - 1)))
        return max(-3.0, min(3.0, centred / std))

    def observe(self, value: float) -> None:
        self.count += 1
        delta = value - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (value - self.mean)

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    @classmethod
    def from_dict(cls, raw: Any) -> RewardScaler:
        try:
            scaler = cls(int(raw["count"]), float(raw["mean"]), float(raw["m2"]))
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"reward scaler: {exc}") from None
        if scaler.count < 0 or scaler.m2 < 0 or not (math.isfinite(scaler.mean) and math.isfinite(scaler.m2)):
            raise ValueError("reward scaler: out of range")
        return scaler
