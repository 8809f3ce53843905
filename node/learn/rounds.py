"""Distillation rounds without a central matchmaker: who runs each round, the plan it publishes, and how the
students' rewards update the shared state. Pure code.

The state (bandit, reward scaler, plan, history) is one signed ledger entry written by the round's
matchmaker; the newest one anywhere in the ledger is the current state (unless `state_rejection`,
`succession_rejection`, `plan_rejection` or `roster_rejection` refuses it, or `turn_rejection` holds it
until its author's turn), so whichever node runs the next round, or takes over a round whose matchmaker
died, starts from the same place, and no member can steer the rounds by planning them.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import msgpack
import numpy as np

from knexa.node.learn.linucb import (
    Candidate,
    LinUCB,
    PairChoice,
    RewardScaler,
    choice_rejection,
    new_bandit,
    node_dim,
    pair_dim,
    plan_pairs,
    round_relative,
)

ALPHA_START, ALPHA_END, ALPHA_ROUNDS = 0.2, 0.5, 10
HISTORY_ROUNDS = 20
MAX_PAIRS = 64
MAX_GAIN = 1.0
# A token loss beyond ~20 nats is a broken adapter; the bound only keeps forged rewards from swamping the scaler.
MAX_LOSS_DROP = 20.0
MAX_CLOCK_SKEW_MS = 60_000  # how far ahead of this node's clock a plan's date may be


# How much earlier than this node's clock says a matchmaker may take its turn, in takeover periods: members
# see a round end a tick or a ledger sync apart.
TURN_SLACK = 0.5


def _rank(round_no: int, peer: str) -> tuple[bytes, str]:
    return hashlib.sha256(f"{round_no}/{peer}".encode()).digest(), peer


def matchmaker_order(round_no: int, members: Sequence[str]) -> list[str]:
    """Who runs round `round_no`: the first of this list; the i-th takes over after i takeover periods.
    Members are ranked by a hash of the round and their id, so any two of them stand in the same order
    whichever other members a node knows of: nodes whose views of the membership differ (a member joining
    or expiring) still agree on who runs the round unless that member is the one they differ by."""
    return sorted(set(members), key=lambda peer: _rank(round_no, peer))


def turn_rejection(state: MatchmakerState, members: Sequence[str], open_for_s: float | None,
                   takeover_s: float) -> str | None:
    """Why this node must not follow `state`, a plan for the round after the one it follows, yet, or None:
    its author's turn has not come. The i-th of `matchmaker_order` plans after i takeover periods; a plan
    made before that (a member planning out of turn, to pick the round's pairs) waits here for as long as its
    author's place says, so that the members before it plan first, and their plans rank before it
    (`newest_state`). `open_for_s`: how long this node has seen the round open for planning (None: not yet)."""
    author = state.plan.matchmaker if state.plan is not None else ""
    rank = matchmaker_order(state.round_no, [*members, author]).index(author)
    if rank == 0 or (open_for_s is not None and open_for_s >= (rank - TURN_SLACK) * takeover_s):
        return None
    return "matchmaker state planned before its author's turn"


def alpha_for(round_no: int) -> float:
    """Weight of the teacher's answers in the student's loss: 0.2 in round 1, rising to 0.5 by round 10."""
    step = (ALPHA_END - ALPHA_START) / (ALPHA_ROUNDS - 1)
    return round(min(ALPHA_END, ALPHA_START + step * max(0, round_no - 1)), 6)


def _str(raw: Mapping[str, Any], name: str) -> str:
    value = raw.get(name)
    if not isinstance(value, str) or not 0 < len(value) <= 128:
        raise ValueError(f"{name} must be a string of 1-128 characters")
    return value


def _int(raw: Mapping[str, Any], name: str, low: int = 0, high: int = 2**62) -> int:
    value = raw.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}]")
    return value


def _float(raw: Mapping[str, Any], name: str, low: float, high: float) -> float:
    value = raw.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= float(value) <= high:
        raise ValueError(f"{name} must be a number in [{low}, {high}]")
    return float(value)


def _finite(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def _map(raw: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise ValueError(f"{what} must be a map")
    return raw


@dataclass(frozen=True)
class RoundPlan:
    round_no: int
    matchmaker: str
    pairs: tuple[PairChoice, ...]
    alpha: float
    transfer_seed: int
    created_ms: int
    deadline_ms: int

    def role_of(self, peer_id: str) -> tuple[str, PairChoice] | None:
        for pair in self.pairs:
            if pair.teacher == peer_id:
                return "teacher", pair
            if pair.student == peer_id:
                return "student", pair
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "round": self.round_no, "matchmaker": self.matchmaker, "pairs": [p.to_dict() for p in self.pairs],
            "alpha": self.alpha, "transfer_seed": self.transfer_seed, "created_ms": self.created_ms,
            "deadline_ms": self.deadline_ms,
        }

    @classmethod
    def from_dict(cls, raw: Any) -> RoundPlan:
        d = _map(raw, "plan")
        pairs = d.get("pairs")
        if not isinstance(pairs, list) or len(pairs) > MAX_PAIRS:
            raise ValueError(f"plan pairs must be a list of at most {MAX_PAIRS}")
        plan = cls(
            _int(d, "round", 1), _str(d, "matchmaker"), tuple(PairChoice.from_dict(p) for p in pairs),
            _float(d, "alpha", 0.0, 1.0), _int(d, "transfer_seed"), _int(d, "created_ms"), _int(d, "deadline_ms"),
        )
        members = [m for p in plan.pairs for m in (p.teacher, p.student)]
        if len(members) != len(set(members)):
            raise ValueError("plan pairs must be disjoint")
        return plan


@dataclass(frozen=True)
class RewardReport:
    """What a student measured after training on its teacher's answers: the change in validation accuracy
    (gain, what people read) and the drop in validation loss (what the bandit learns from)."""

    round_no: int
    student: str
    teacher: str
    gain: float
    accuracy_after: float
    swapped: bool
    loss_drop: float

    def to_dict(self) -> dict[str, Any]:
        return {"round": self.round_no, "student": self.student, "teacher": self.teacher, "gain": self.gain,
                "accuracy_after": self.accuracy_after, "swapped": self.swapped, "loss_drop": self.loss_drop}

    @classmethod
    def from_dict(cls, raw: Any) -> RewardReport:
        d = _map(raw, "reward")
        swapped = d.get("swapped")
        if not isinstance(swapped, bool):
            raise ValueError("swapped must be a boolean")
        return cls(_int(d, "round", 1), _str(d, "student"), _str(d, "teacher"),
                   _float(d, "gain", -MAX_GAIN, MAX_GAIN), _float(d, "accuracy_after", 0.0, 1.0), swapped,
                   _float(d, "loss_drop", -MAX_LOSS_DROP, MAX_LOSS_DROP))


@dataclass(frozen=True)
class RoundRecord:
    """One finished round, as `knexa-node rounds` shows it."""

    round_no: int
    matchmaker: str
    pairs: tuple[PairChoice, ...]
    rewards: tuple[tuple[str, float, float, float], ...]  # (student, gain, loss drop, z-scored reward) applied

    def to_dict(self) -> dict[str, Any]:
        return {"round": self.round_no, "matchmaker": self.matchmaker, "pairs": [p.to_dict() for p in self.pairs],
                "rewards": [list(r) for r in self.rewards]}

    @classmethod
    def from_dict(cls, raw: Any) -> RoundRecord:
        d = _map(raw, "record")
        pairs, rewards = d.get("pairs"), d.get("rewards")
        if not isinstance(pairs, list) or not isinstance(rewards, list) or len(pairs) > MAX_PAIRS:
            raise ValueError("record pairs and rewards must be lists")
        parsed = []
        for r in rewards[:MAX_PAIRS]:
            if not (isinstance(r, list | tuple) and len(r) == 4 and isinstance(r[0], str)
                    and all(_finite(v) for v in r[1:])):
                raise ValueError("record reward must be [student, gain, loss drop, reward]")
            parsed.append((r[0], float(r[1]), float(r[2]), float(r[3])))
        return cls(_int(d, "round", 1), _str(d, "matchmaker"), tuple(PairChoice.from_dict(p) for p in pairs),
                   tuple(parsed))


@dataclass(frozen=True)
class MatchmakerState:
    round_no: int  # the last round planned (0: none yet)
    bandit: LinUCB
    scaler: RewardScaler
    plan: RoundPlan | None = None
    history: tuple[RoundRecord, ...] = field(default_factory=tuple)

    @classmethod
    def initial(cls) -> MatchmakerState:
        return cls(0, new_bandit(), RewardScaler())

    @property
    def created_ms(self) -> int:
        return self.plan.created_ms if self.plan is not None else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "round": self.round_no, "bandit": self.bandit.to_dict(), "scaler": self.scaler.to_dict(),
            "plan": self.plan.to_dict() if self.plan is not None else None,
            "history": [r.to_dict() for r in self.history],
        }

    @classmethod
    def from_dict(cls, raw: Any) -> MatchmakerState:
        d = _map(raw, "matchmaker state")
        history = d.get("history")
        if not isinstance(history, list) or len(history) > HISTORY_ROUNDS:
            raise ValueError(f"history must be a list of at most {HISTORY_ROUNDS}")
        plan = RoundPlan.from_dict(d["plan"]) if d.get("plan") is not None else None
        state = cls(_int(d, "round"), LinUCB.from_dict(d.get("bandit")), RewardScaler.from_dict(d.get("scaler")),
                    plan, tuple(RoundRecord.from_dict(r) for r in history))
        if state.bandit.dim != pair_dim():
            raise ValueError(f"the bandit's dimension is {state.bandit.dim}, pair contexts have {pair_dim()}")
        if plan is not None and plan.round_no != state.round_no:
            raise ValueError("the plan's round differs from the state's")
        if any(len(p.context) != state.bandit.dim for p in (plan.pairs if plan else ())):
            raise ValueError("a pair's context does not match the bandit's dimension")
        return state


def fit_state(state: MatchmakerState, max_bytes: int) -> MatchmakerState:
    """The state with its oldest history dropped until its encoding fits in max_bytes (the plan, the bandit
    and the last round's record always stay: the next round needs the first two, and the last round's
    record is what other nodes check the bandit against, see `succession_rejection`)."""
    history = state.history
    while len(history) > 1 and len(msgpack.packb(replace(state, history=history).to_dict())) > max_bytes:
        history = history[1:]
    return state if history is state.history else replace(state, history=history)


def plan_rejection(plan: RoundPlan, bandit: LinUCB) -> str | None:
    """Why a plan is not one the rounds' own rules could have made with `bandit` (its state's), or None. The
    alpha and the transfer seed follow from the round number: a matchmaker that chose them could choose
    what students learn. The pairs must be the bandit's choice (`choice_rejection`)."""
    if abs(plan.alpha - alpha_for(plan.round_no)) > 1e-9:
        return "plan with another alpha than its round's"
    if plan.transfer_seed != transfer_seed_of(plan.round_no):
        return "plan with another transfer seed than its round's"
    if plan.deadline_ms < plan.created_ms:
        return "plan whose deadline comes before it was made"
    return choice_rejection(plan.pairs, bandit, plan.round_no)


def roster_rejection(plan: RoundPlan, settled: Mapping[str, Sequence[float]],
                     known: Iterable[str] = ()) -> str | None:
    """Why a plan leaves out, or misstates, members its matchmaker must have known of, or None. `settled`:
    the profile vector each live member published (as `profile_vector` makes it), for the members this node
    has known, with that profile, since well before the round before this plan began; `known`: other such
    members, whose profile is not checked. An honest matchmaker names every member it knows of but one
    when their number is odd, with the profile it published; members that joined or changed their skills
    lately may reach it later or sooner than this node, so only the settled ones are checked."""
    n = node_dim()
    named: dict[str, Sequence[float]] = {}
    for pair in plan.pairs:
        named[pair.teacher], named[pair.student] = pair.context[:n], pair.context[n:2 * n]
    if len((set(settled) | set(known)) - set(named)) > 1:
        return "plan leaving out members that every node knew of"
    for peer, vector in named.items():
        published = settled.get(peer)
        if published is not None and not np.allclose(vector, published, rtol=0.0, atol=1e-12):
            return "plan stating another profile for a member than it published"
    return None


def capped_deadline(plan: RoundPlan, max_round_s: float) -> RoundPlan:
    """The plan with its deadline no later than max_round_s after it was made: a matchmaker may not hold
    a round open longer than this node would."""
    latest = plan.created_ms + int(max_round_s * 1000)
    return plan if plan.deadline_ms <= latest else replace(plan, deadline_ms=latest)


def quorum_round(followed: Mapping[str, int], author: str, me: str) -> int | None:
    """The highest round that more than half of the other members follow: neither the state's author (its
    word on its own state counts for nothing) nor this node `me`, nor a member that follows no round yet
    (0: it is joining). None when no such member is left."""
    rounds = sorted((r for peer, r in followed.items() if peer not in (author, me) and r > 0), reverse=True)
    return rounds[len(rounds) // 2] if rounds else None


def state_rejection(state: MatchmakerState, author: str, followed: Mapping[str, int], me: str,
                    now_ms: int) -> str | None:
    """Why a member's state must not be followed now, or None. `followed`: the round each member follows
    (from its member record; this node's own from memory). A state may be one round ahead of the one this
    node follows, or of what most other members follow (a node that joined or fell behind catches up), no
    further: one member cannot move the rounds ahead on its own (a round number near the limit would stop
    them for good), and members that lag or lie low cannot hold a node back. Where neither is known (a new
    mesh, or all of it restarted) the state is taken on trust. Nor may a plan be dated in the future (the
    next round would wait for that date)."""
    if state.plan is None:
        return "matchmaker state without a plan"
    if state.plan.created_ms > now_ms + MAX_CLOCK_SKEW_MS:
        return "matchmaker state dated in the future"
    own, quorum = followed.get(me, 0), quorum_round(followed, author, me)
    if (own > 0 or quorum is not None) and state.round_no > max(own, quorum or 0) + 1:
        return "matchmaker state ahead of the round the members follow"
    return None


def succession_rejection(parent: MatchmakerState, child: MatchmakerState,
                         signed: Mapping[str, RewardReport]) -> str | None:
    """Why `child`, a state for the round after `parent`'s, is not what closing `parent`'s round with the
    rewards it records gives, or None. `signed`: the students' reward records this node holds; a recorded
    reward must be the student's own where this node holds the student's report for that round. A child
    may differ from its parent only by the rewards of the parent's round and the next plan: a matchmaker
    cannot rewrite what the bandit has learned."""
    if child.round_no != parent.round_no + 1:
        raise ValueError("the child's round must follow the parent's")
    rewards: dict[str, RewardReport] = {}
    if parent.plan is not None:
        if not child.history or child.history[-1].round_no != parent.round_no:
            return "matchmaker state that does not record the round before it"
        record, plan = child.history[-1], parent.plan
        if record.matchmaker != plan.matchmaker or _couples(record.pairs) != _couples(plan.pairs):
            return "matchmaker state recording another plan than the one it closes"
        teachers = {p.student: p.teacher for p in plan.pairs}
        for student, gain, loss_drop, _ in record.rewards:
            held = signed.get(student)
            if student not in teachers or student in rewards:
                return "matchmaker state recording a reward of no student of the round"
            if held is not None and held.round_no == plan.round_no and (held.gain, held.loss_drop) != (gain, loss_drop):
                return "matchmaker state recording another reward than the student signed"
            rewards[student] = RewardReport(plan.round_no, student, teachers[student], gain, 0.0, False, loss_drop)
    expected, _ = close_round(parent, rewards)
    if not _same_learning(expected, child):
        return "matchmaker state whose bandit is not its rewards' result"
    return None


def _couples(pairs: Sequence[PairChoice]) -> list[tuple[str, str]]:
    return [(p.teacher, p.student) for p in pairs]


def _same_learning(expected: MatchmakerState, child: MatchmakerState) -> bool:
    """Same bandit and scaler (up to float noise), and the child's history a tail of the expected one (old
    rounds give way to fit one ledger entry), its last record with the same rewards."""
    a, b = expected.bandit, child.bandit
    if (a.dim, a.lam, a.beta0, a.updates) != (b.dim, b.lam, b.beta0, b.updates):
        return False
    if not (np.allclose(a.A, b.A, rtol=1e-9, atol=1e-12) and np.allclose(a.b, b.b, rtol=1e-9, atol=1e-12)):
        return False
    x, y = expected.scaler, child.scaler
    if x.count != y.count or not (_close(x.mean, y.mean) and _close(x.m2, y.m2)):
        return False
    history = child.history
    if len(history) > len(expected.history):
        return False
    tail = expected.history[len(expected.history) - len(history):] if history else ()
    return all(_same_record(mine, theirs) for mine, theirs in zip(tail, history, strict=True))


def _close(x: float, y: float) -> bool:
    return math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12)


def _same_record(mine: RoundRecord, theirs: RoundRecord) -> bool:
    if (mine.round_no, mine.matchmaker, _couples(mine.pairs)) != (
            theirs.round_no, theirs.matchmaker, _couples(theirs.pairs)):
        return False
    if len(mine.rewards) != len(theirs.rewards):
        return False
    return all(m[0] == t[0] and all(_close(u, v) for u, v in zip(m[1:], t[1:], strict=True))
               for m, t in zip(mine.rewards, theirs.rewards, strict=True))


def newest_state(states: Iterable[MatchmakerState]) -> MatchmakerState | None:
    """The state of the latest round; of two for the same round (matchmakers that raced, or one that planned
    out of turn), the one whose matchmaker comes first in `matchmaker_order` (not the later plan: a plan's
    date is its author's word)."""
    best: MatchmakerState | None = None
    for state in states:
        if best is None or state.round_no > best.round_no or (
                state.round_no == best.round_no and _state_rank(state) < _state_rank(best)):
            best = state
    return best


def _state_rank(state: MatchmakerState) -> tuple[bytes, str]:
    return _rank(state.round_no, state.plan.matchmaker if state.plan is not None else "")


def reward_rejection(plan: RoundPlan, report: RewardReport, author: str) -> str | None:
    """Why a reward cannot count for this plan, or None."""
    if report.student != author:
        return "reward signed by another node than the student it names"
    if report.round_no != plan.round_no:
        return "reward for another round"
    role = plan.role_of(author)
    if role is None or role[0] != "student":
        return "reward from a node that was not a student this round"
    if role[1].teacher != report.teacher:
        return "reward names another teacher than the assigned one"
    return None


# What the matchmaker learns from. "loss_drop" (the daemon's): the student's drop in validation loss, kept
# shadow or not. "kept_loss_drop": only a kept shadow's drop counts as a gain (an experiment of the
# distillation benchmark, `--reward`: it changes only the LinUCB condition).
REWARD_SIGNALS = ("loss_drop", "kept_loss_drop")


def reward_signal(report: RewardReport, signal: str = "loss_drop") -> float:
    if signal == "kept_loss_drop" and not report.swapped:
        return min(report.loss_drop, 0.0)
    if signal not in REWARD_SIGNALS:
        raise ValueError(f"unknown reward signal {signal!r}")
    return report.loss_drop


def close_round(
    state: MatchmakerState, rewards: Mapping[str, RewardReport], signal: str = "loss_drop"
) -> tuple[MatchmakerState, list[str]]:
    """Apply the students' rewards (keyed by the ledger author that signed them) to the bandit and record
    the round. Returns the new state and why any reward was left out."""
    plan = state.plan
    if plan is None:
        return state, []
    bandit = LinUCB.from_dict(state.bandit.to_dict())  # a copy: states are values
    scaler = RewardScaler.from_dict(state.scaler.to_dict())
    rejected: list[str] = []
    valid: list[tuple[str, RewardReport]] = []
    for author in sorted(rewards):
        report = rewards[author]
        reason = reward_rejection(plan, report, author)
        if reason is None:
            valid.append((author, report))
        elif report.round_no == plan.round_no:
            rejected.append(f"{author}: {reason}")
    # Every student's loss falls less from round to round, whoever taught it: against its own round's mean
    # (when the round has more than one pair) a reward says how much better this pairing did than the others.
    drops = [reward_signal(report, signal) for _, report in valid]
    baseline = sum(drops) / len(drops) if len(drops) >= 2 else None
    pairs = [next(p for p in plan.pairs if p.student == author) for author, _ in valid]
    contexts = [np.asarray(p.context, dtype=float) for p in pairs]
    if baseline is not None:
        contexts = round_relative(contexts)
    applied: list[tuple[str, float, float, float]] = []
    for (author, report), drop, context in zip(valid, drops, contexts, strict=True):
        reward = scaler.z(drop, baseline)
        if reward is not None:  # else recorded with reward 0, and the bandit left as it was
            bandit.update(context, reward)
        applied.append((author, report.gain, report.loss_drop, reward or 0.0))
    for drop in drops:
        scaler.observe(drop)
    record = RoundRecord(plan.round_no, plan.matchmaker, plan.pairs, tuple(applied))
    history = (*state.history, record)[-HISTORY_ROUNDS:]
    return MatchmakerState(state.round_no, bandit, scaler, None, history), rejected


def transfer_seed_of(round_no: int) -> int:
    """The seed every node draws a round's public transfer prompts from: the teacher to answer them, the
    student to check that what it is sent answers those prompts and nothing else."""
    return round_no


def next_plan(
    state: MatchmakerState,
    candidates: Sequence[Candidate],
    matchmaker: str,
    now_ms: int,
    round_deadline_s: float,
) -> MatchmakerState:
    """Plan the round after `state.round_no` (call close_round first if a plan is open)."""
    round_no = state.round_no + 1
    pairs = plan_pairs(candidates, state.bandit, round_no)
    plan = RoundPlan(
        round_no, matchmaker, tuple(pairs), alpha_for(round_no), transfer_seed=transfer_seed_of(round_no),
        created_ms=now_ms, deadline_ms=now_ms + int(round_deadline_s * 1000),
    )
    return replace(state, round_no=round_no, plan=plan)


def round_finished(plan: RoundPlan, rewards: Mapping[str, RewardReport], now_ms: int,
                   gone: Collection[str] = ()) -> bool:
    """Every pair is done, or the deadline has passed. A pair is done when its student has reported, or when
    its teacher or its student is `gone` (it died or left: its membership has been missing for a while), so
    that one dead node does not hold the other pairs up until the deadline."""
    if now_ms >= plan.deadline_ms:
        return True
    return all(reported(plan, p.student, rewards) or p.teacher in gone or p.student in gone for p in plan.pairs)


def round_timing(plan: RoundPlan | None, round_no: int) -> str:
    """Where round `round_no` stands for a node whose open plan is `plan`: "open", "ahead" (its plan has not
    reached this node yet, or the round was never planned), or "over"."""
    if plan is None or round_no > plan.round_no:
        return "ahead"
    return "open" if round_no == plan.round_no else "over"


def reported(plan: RoundPlan, student: str, rewards: Mapping[str, RewardReport]) -> bool:
    """The student has written a reward that counts for this plan."""
    report = rewards.get(student)
    return report is not None and reward_rejection(plan, report, student) is None


def check_transfer(plan: RoundPlan | None, sender: str, recipient: str, round_no: int) -> str | None:
    """Why a transfer payload must be refused, or None: only the assigned teacher of this round may send
    its student answers."""
    if plan is None or plan.round_no != round_no:
        return f"round {round_no} is not the open round"
    role = plan.role_of(recipient)
    if role is None or role[0] != "student":
        return "this node is not a student this round"
    if role[1].teacher != sender:
        return "the sender is not this node's assigned teacher"
    return None
