"""The learning-together protocol unit: local training on the user's data, and distillation rounds run by a
matchmaker that no node owns.

Ledger records (kind `learn`, each signed by its author, under its own namespace):
- `learn/<peer>/member`: the node takes part; its validation accuracy, skills and the round it follows
  (refreshed, expires);
- `learn/<peer>/state`: the matchmaker state (LinUCB A and b, reward scaler, the open plan, history), written by
  whichever node ran the newest round; the newest anywhere that passes `state_rejection` (not too far ahead)
  and `succession_rejection` (the state before it, closed with the rewards the students signed) is the
  current one;
- `learn/<peer>/reward`: a student's measured accuracy gain and loss drop for a round.
Every tick a node reads them: a teacher in the open plan answers the transfer set and sends it to its student
over `learn.transfer`; the student trains a shadow adapter on its own data mixed with the answers, keeps it
only if it validates better, and writes its reward. When a round is finished (every reward in, or its
deadline passed) the next round's matchmaker, first of `matchmaker_order(round, members)`, closes it and
publishes the next plan; the i-th in that order does so itself if nobody has after i takeover periods, so a
dead matchmaker holds the mesh up by at most that long.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import trio
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID as PeerID

from knexa.net.rpc import ErrorCode, RpcError, RpcService, sign_payload, verify_detached
from knexa.node.engine import AdapterError
from knexa.node.errors import describe
from knexa.node.learn import agent as learner
from knexa.node.learn import tasks
from knexa.node.learn.errors import LearnError
from knexa.node.learn.linucb import Candidate, pair_context, profile_vector
from knexa.node.learn.records import ParsedRecords, RecordRefused
from knexa.node.learn.rounds import (
    MAX_GAIN,
    MAX_LOSS_DROP,
    MatchmakerState,
    RewardReport,
    capped_deadline,
    check_transfer,
    close_round,
    fit_state,
    matchmaker_order,
    newest_state,
    next_plan,
    plan_rejection,
    quorum_round,
    reported,
    roster_rejection,
    round_finished,
    round_timing,
    state_rejection,
    succession_rejection,
    transfer_seed_of,
    turn_rejection,
)
from knexa.node.learn.settings import LearnSettings
from knexa.node.learn.wire import (
    METHOD_TRANSFER,
    TRANSFER_TOPIC,
    TransferCall,
    TransferError,
    TransferReply,
    TransferSet,
)
from knexa.node.paths import write_json_atomically

if TYPE_CHECKING:
    from knexa.crdt.entry import Entry
    from knexa.crdt.ledger import Ledger
    from knexa.node.engine import Engine

log = logging.getLogger("knexa.learn")

LIVE_ADAPTER = "learned"
ENROLMENT_FILE = "learning.json"  # in the data dir: the data file of the node's last `learn`, until it leaves
MEMBER, STATE, REWARD = "member", "state", "reward"
TRANSFER_TIMEOUT_S = 60.0
LOG_ROUNDS = 100
# The state is one ledger entry (64 KiB at most with its key and signature): older history gives way.
STATE_MAX_BYTES = 48 * 1024
MAX_VERDICTS = 1024  # verdicts on states remembered so that each is counted once


@dataclass
class RoundLog:
    """What this node did in one round (for `knexa-node rounds`)."""

    round_no: int
    role: str
    partner: str
    detail: dict[str, Any] = field(default_factory=dict)


def _first_time(seen: set[tuple[Any, ...]], key: tuple[Any, ...]) -> bool:
    """Whether `key` is new to `seen` (then remembered; `seen` starts afresh past MAX_VERDICTS)."""
    if key in seen:
        return False
    if len(seen) >= MAX_VERDICTS:
        seen.clear()
    seen.add(key)
    return True


class MemberRecord(NamedTuple):
    accuracy: float
    skills: dict[str, float]
    round_no: int  # the round of the matchmaker state the member follows (0: none yet)


def _parse_member(_author: str, record: object) -> MemberRecord:
    if not isinstance(record, dict):
        raise TypeError("a member record is a map")
    accuracy = float(record["accuracy"])
    skills = {str(k): float(v) for k, v in dict(record["skills"]).items()}
    round_no = record.get("round", 0)  # absent in records of nodes from before it was added
    if not 0 <= accuracy <= 1:
        raise ValueError("accuracy out of range")
    if not isinstance(round_no, int) or isinstance(round_no, bool) or not 0 <= round_no < 2**62:
        raise ValueError("round out of range")
    return MemberRecord(accuracy, skills, round_no)


def _parse_state(author: str, record: object, max_round_s: float) -> MatchmakerState:
    state = MatchmakerState.from_dict(record)
    if state.plan is None:
        return state
    if state.plan.matchmaker != author:
        raise RecordRefused("state naming another matchmaker")
    if (reason := plan_rejection(state.plan, state.bandit)) is not None:
        raise RecordRefused(reason)
    return replace(state, plan=capped_deadline(state.plan, max_round_s))


class LearnService:
    def __init__(
        self,
        rpc: RpcService,
        key_pair: KeyPair,
        peer_id: str,
        engine: Callable[[], Engine],
        ledger: Callable[[], Ledger | None],
        announce: Callable[[list[Entry]], None],
        data_dir: Path,
        on_skills: Callable[[dict[str, float]], None] = lambda skills: None,
        settings: LearnSettings | None = None,
    ) -> None:
        self.rpc, self.key_pair, self.peer_id = rpc, key_pair, peer_id
        self._engine, self._ledger, self._announce = engine, ledger, announce
        self.adapter_dir = data_dir / "adapters" / LIVE_ADAPTER
        self.enrolment_file = data_dir / ENROLMENT_FILE
        self._on_skills = on_skills
        self.settings = settings or LearnSettings()
        self.train: list[tasks.Example] = []
        self.val: list[tasks.Example] = []  # the node's own split, then the shared examples
        self.shared_val = 0  # how many of val are the shared validation set's
        self.evaluation: learner.Evaluation | None = None
        self.local_outcome: dict[str, Any] | None = None
        self.rejoined = False  # enrolled again after a restart, without local training
        self.phase = "idle"  # idle, training, enrolled, leaving
        self.log: list[RoundLog] = []
        self.rejected: dict[str, int] = {}
        # Read on every tick; parsed (and, if bad, counted) once per version.
        self._members = ParsedRecords(_parse_member, "bad member record", self._count)
        self._states = ParsedRecords(
            lambda author, record: _parse_state(author, record, self.settings.round_deadline_s),
            "bad matchmaker state", self._count)
        self._prompts_read: tuple[tuple[int, str, int, int], list[str]] | None = None  # the last round's
        # The states this node followed in the last two rounds (round 0: none yet), to check the next against.
        self._followed_states: dict[int, MatchmakerState] = {0: MatchmakerState.initial()}
        self._followed = 0  # the round of the state this node follows, as its member record says
        self._refused_states: set[tuple[str, int, str]] = set()  # (author, round, reason), counted once
        self._following_since: dict[int, int] = {}  # round -> when this node began following it (ms)
        # member -> (its profile, since when (ms), since when it has been a member (ms))
        self._profiles_seen: dict[str, tuple[tuple[float, ...], int, int]] = {}
        self._missing_since: dict[str, float] = {}  # former member -> when its membership went (monotonic)
        self._checked_states: set[tuple[str, int, int]] = set()  # (author, round, created), counted once
        self.states_checked = 0
        self._rewards = ParsedRecords(lambda _author, record: RewardReport.from_dict(record), "bad reward record",
                                      self._count)
        self.last_error: str | None = None
        self._training = trio.Lock()
        self._acted: set[tuple[int, str]] = set()  # (round, role) done or under way here
        self._finished_seen: dict[int, float] = {}  # round -> when this node first saw it finished
        self._member_written = 0.0
        self._nursery: trio.Nursery | None = None
        rpc.register(METHOD_TRANSFER, self._handle_transfer, TransferCall, TransferReply)

    # -- lifecycle -------------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            if self.enrolment_file.is_file():
                nursery.start_soon(self._rejoin)
            while True:
                await trio.sleep(self.settings.tick_s)
                try:
                    self._tick()
                except Exception as exc:  # one bad tick (a record we cannot use) must not stop the rounds
                    log.warning('event=learn_tick_failed reason="%s"', describe(exc))

    @property
    def own_validation(self) -> int:
        """How many validation examples come from the node's own data."""
        return len(self.val) - self.shared_val

    # -- local learning --------------------------------------------------------------------------
    def _check_can_train(self) -> None:
        if self.phase == "leaving":  # first: a stopping node may still be finishing a student's training
            raise LearnError("unavailable", "this node is stopping")
        if self._training.locked():
            raise LearnError("busy", "this node is already training")

    async def _read(self, data_file: Path) -> list[tasks.Example]:
        self._check_can_train()
        try:
            # Up to 64 MiB of JSON: parsed off the trio loop.
            return await trio.to_thread.run_sync(tasks.load_jsonl, data_file)
        except tasks.DataError as exc:
            raise LearnError("bad_request", str(exc)) from None

    async def start_learning(self, data_file: Path) -> None:
        """`learn` in the background: the data file is checked now, and this returns once training has begun
        (the status then says so); what fails later is reported in the status."""
        examples = await self._read(data_file)
        assert self._nursery is not None
        await self._nursery.start(self._learn_logged, examples, data_file)

    async def _learn_logged(self, examples: list[tasks.Example], data_file: Path, *,
                            task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        begun = False

        def begin() -> None:
            nonlocal begun
            begun = True
            task_status.started()

        try:
            await self._learn(examples, data_file, on_training=begin)
        except Exception as exc:
            if not begun:
                raise  # to start_learning's caller, as `learn` would
            self.last_error = describe(exc)  # reported in status; the daemon goes on serving
            log.warning('event=learn_failed reason="%s"', self.last_error)

    async def learn(self, data_file: Path) -> dict[str, Any]:
        """Train the live adapter on the user's private data (kept only if it validates better than before),
        then take part in distillation rounds."""
        return await self._learn(await self._read(data_file), data_file)

    async def _rejoin(self) -> None:
        """After a restart, a node that had enrolled (and not left) takes part again: its saved adapter is
        evaluated on the same data file, without training locally again."""
        try:
            data_file = Path(json.loads(self.enrolment_file.read_text())["data"])
            while (state := self._engine().status()["state"]) != "ready":  # the model loads after the start
                if state == "down":
                    raise LearnError("unavailable", "the engine is down")
                await trio.sleep(self.settings.tick_s)
            if self.evaluation is not None or self._training.locked():
                return  # the user ran `learn` meanwhile
            status = await self._learn(await self._read(data_file), data_file, train_locally=False)
            log.info("event=learn_rejoined data=%s accuracy=%.3f", data_file, status["accuracy"])
        except Exception as exc:  # e.g. the data file is gone: the node serves, and `learn` enrols it again
            self.last_error = f"could not rejoin the rounds after the restart: {describe(exc)}"
            log.warning('event=learn_rejoin_failed reason="%s"', self.last_error)

    async def _learn(self, examples: list[tasks.Example], data_file: Path, *,
                     train_locally: bool = True, on_training: Callable[[], None] = lambda: None) -> dict[str, Any]:
        self._check_can_train()
        self.last_error = None
        async with self._training:
            self.phase = "training"
            try:
                engine = self._engine()
                await self._restore_adapter(engine)
                self.train, own_val = tasks.split_train_val(examples, self.settings.val_fraction, seed=0)
                if not own_val:
                    own_val = list(self.train)  # one example: validate on what there is
                shared = (tasks.public_validation(self.settings.public_validation,
                                                  family=self.settings.task_family)
                          if tasks.uses_task_family(examples) else [])
                self.val, self.shared_val = own_val + shared, len(shared)
                on_training()
                self.evaluation = await learner.evaluate(engine, LIVE_ADAPTER, self.val)
                self.rejoined = not train_locally
                if train_locally:
                    outcome = await self._train_and_keep(engine, learner.mixed_examples(self.train, [], 0.0),
                                                         self.settings.local_steps)
                    self.local_outcome = outcome.to_dict()
                self._on_skills(dict(self.evaluation.skills))
            finally:
                if self.phase != "leaving":
                    self.phase = "enrolled" if self.evaluation is not None else "idle"
        self._remember_enrolment(data_file)
        self._write_member()
        log.info("event=learned examples=%d accuracy=%.3f trained=%s swapped=%s", len(examples),
                 self.evaluation.accuracy, train_locally, (self.local_outcome or {}).get("swapped"))
        return self.status()

    def _remember_enrolment(self, data_file: Path | None) -> None:
        """Written when the node enrols, removed when it leaves the rounds (not when it stops)."""
        try:
            if data_file is None:
                self.enrolment_file.unlink(missing_ok=True)
                return
            write_json_atomically(self.enrolment_file, {"data": str(data_file.expanduser().resolve())})
        except OSError as exc:  # the node takes part all the same; only a restart forgets it
            log.warning('event=enrolment_not_saved reason="%s"', exc)

    async def _restore_adapter(self, engine: Engine) -> None:
        if LIVE_ADAPTER in engine.adapters():
            return
        if (self.adapter_dir / "adapter_config.json").is_file():
            try:
                await engine.load_adapter(LIVE_ADAPTER, self.adapter_dir)
                return
            except AdapterError as exc:  # e.g. a save cut short: kept aside, and learning starts afresh
                aside = self.adapter_dir.with_name(f"{LIVE_ADAPTER}.unreadable-{int(time.time())}")
                self.adapter_dir.rename(aside)
                log.warning('event=adapter_unreadable moved_to=%s reason="%s"', aside, exc)
        await engine.ensure_adapter(LIVE_ADAPTER)

    async def _train_and_keep(self, engine: Engine, examples: list, steps: int) -> learner.TrainOutcome:
        s = self.settings
        outcome = await learner.train_and_keep_if_better(
            engine, LIVE_ADAPTER, examples, self.val, steps=steps, before=self.evaluation, lr=s.lr,
            latency_target_s=s.latency_target_s, min_share=s.min_training_share,
        )
        self.evaluation = outcome.live
        if outcome.swapped:
            await engine.save_adapter(LIVE_ADAPTER, self.adapter_dir)
        return outcome

    # -- ledger records --------------------------------------------------------------------------
    def _put(self, topic: str, record: dict[str, Any], ttl_s: float | None) -> None:
        ledger = self._ledger()
        if ledger is None:
            return
        self._announce([ledger.put_learn(topic, record, ttl_s)])

    def _write_member(self) -> None:
        if self.evaluation is None or self.phase != "enrolled":  # e.g. a round ending after the node left
            return
        self._member_written = time.monotonic()
        self._put(MEMBER, {"accuracy": self.evaluation.accuracy, "skills": dict(self.evaluation.skills),
                           "examples": len(self.train) + self.own_validation, "round": self._followed},
                  self.settings.member_ttl_s)

    def leave(self) -> list[Entry]:
        """The node is stopping: it takes part in no more rounds, and withdraws its membership (the entries
        returned, for the ledger service to push) so that no matchmaker pairs it meanwhile."""
        self.phase = "leaving"
        return self._retract_member()

    def leave_rounds(self) -> dict[str, Any]:
        """Stop taking part in rounds while the node goes on serving: the membership is withdrawn at once (a
        shadow still training for a round finishes and reports); the adapter stays. `learn` joins again."""
        if self.phase == "training":
            raise LearnError("busy", "local training is under way; leave when it has ended")
        if self.phase != "enrolled":
            raise LearnError("not_enrolled", "this node takes part in no rounds")
        self.phase = "idle"
        self._announce(self._retract_member())
        self._remember_enrolment(None)
        log.info("event=left_rounds")
        return self.status()

    def _retract_member(self) -> list[Entry]:
        ledger = self._ledger()
        if ledger is None or self.peer_id not in self._learn_entries(MEMBER):
            return []
        return [ledger.retract_learn(MEMBER, self.settings.member_ttl_s)]

    def _member_records(self) -> dict[str, MemberRecord]:
        """Each live member's validation accuracy and skills, as it published them."""
        return self._members.read(self._learn_entries(MEMBER))

    def members(self) -> dict[str, Candidate]:
        return {author: Candidate(author, profile_vector(m.skills, m.accuracy), m.accuracy)
                for author, m in self._member_records().items()}

    def current_state(self) -> MatchmakerState | None:
        """The newest matchmaker state in the ledger that this node may follow (see `state_rejection`)."""
        records = self._member_records()
        followed = {author: m.round_no for author, m in records.items()}
        if self._followed:
            followed[self.peer_id] = self._followed
        now_ms = int(time.time() * 1000)
        self._note_profiles(records, now_ms)
        signed = self.rewards()
        usable = []
        states = self._states.read(self._learn_entries(STATE))
        for author, state in states.items():
            reason = state_rejection(state, author, followed, self.peer_id, now_ms)
            if reason is None:
                reason = self._succession_rejection(state, author, signed, followed, states)
            if reason is None:
                reason = self._roster_rejection(state)
            if reason is None and (held := self._turn_rejection(state, list(followed))) is not None:
                if _first_time(self._refused_states, (author, state.round_no, held)):
                    log.info('event=state_held author=%s round=%d reason="%s"', author, state.round_no, held)
                continue  # not refused: it may be followed once its author's turn has come
            if reason is None:
                usable.append(state)
            elif _first_time(self._refused_states, (author, state.round_no, reason)):
                self._count(reason)
                log.warning('event=state_refused author=%s round=%d reason="%s"', author, state.round_no, reason)
        chosen = newest_state(usable)
        if chosen is not None:
            self._followed_states[chosen.round_no] = chosen
            self._following_since.setdefault(chosen.round_no, now_ms)
            for old in [r for r in self._followed_states if r < chosen.round_no - 1]:
                del self._followed_states[old]
            for old in [r for r in self._following_since if r < chosen.round_no - 1]:
                del self._following_since[old]
        return chosen

    def _note_profiles(self, records: dict[str, MemberRecord], now_ms: int) -> None:
        """Remember since when each live member has been one, and has published the profile it publishes now."""
        for author, record in records.items():
            vector = tuple(float(v) for v in profile_vector(record.skills, record.accuracy))
            known = self._profiles_seen.get(author)
            if known is None:
                self._profiles_seen[author] = (vector, now_ms, now_ms)
            elif known[0] != vector:
                self._profiles_seen[author] = (vector, now_ms, known[2])
        for gone in set(self._profiles_seen) - set(records):
            del self._profiles_seen[gone]
            self._missing_since[gone] = time.monotonic()
        # Back, or gone for longer than any plan that names it can stay open.
        forgotten = time.monotonic() - self.settings.member_ttl_s - self.settings.round_deadline_s
        for peer in [p for p, since in self._missing_since.items() if p in records or since < forgotten]:
            del self._missing_since[peer]

    def _gone(self) -> set[str]:
        """Members whose membership this node has missed for a whole membership lifetime: they died or left
        (a record that only lags in reaching this node comes back with the member's next refresh)."""
        horizon = time.monotonic() - self.settings.member_ttl_s
        return {peer for peer, since in self._missing_since.items() if since <= horizon}

    def _roster_rejection(self, state: MatchmakerState) -> str | None:
        """Whether a plan for the round after the one this node follows leaves out, or misstates, members
        whose profiles this node has held unchanged since a takeover period before it began following that
        round (see `roster_rejection`). That round's students are left out: one that keeps its shadow
        publishes new skills as the round ends, which may reach the matchmaker before this node. A node not
        in the rounds, or that joined later, does not check."""
        began, parent = self._following_since.get(self._followed), self._followed_states.get(self._followed)
        if not self._checks_next_round(state) or began is None or parent is None or parent.plan is None:
            return None
        cutoff = began - int(self.settings.takeover_s * 1000)
        students = {pair.student for pair in parent.plan.pairs}
        members = {peer for peer, (_, _, member_since) in self._profiles_seen.items() if member_since <= cutoff}
        settled = {peer: vector for peer, (vector, since, _) in self._profiles_seen.items()
                   if peer in members and since <= cutoff and peer not in students}
        return roster_rejection(state.plan, settled, members)

    def _succession_rejection(self, state: MatchmakerState, author: str, signed: dict[str, RewardReport],
                              followed: dict[str, int], states: dict[str, MatchmakerState]) -> str | None:
        """Checked against the state of the round before that this node followed or, where it followed none
        (it joined later), against the states of that round the ledger still holds (one of them must fit).
        With none of either it cannot check, and takes the state within the quorum's bound."""
        followed_parent = self._followed_states.get(state.round_no - 1)
        parents = [followed_parent] if followed_parent is not None else [
            s for s in states.values() if s.round_no == state.round_no - 1]
        if not parents:
            return None
        reasons = [succession_rejection(parent, state, signed) for parent in parents]
        reason = None if None in reasons else reasons[0]
        if reason is None and _first_time(self._checked_states, (author, state.round_no, state.created_ms)):
            self.states_checked += 1
        if reason is not None:
            if (quorum_round(followed, author, self.peer_id) or 0) >= state.round_no:
                return None  # most members follow it: the state this node followed lost a race for its round
        return reason

    def _checks_next_round(self, state: MatchmakerState) -> bool:
        """Whether `state` is a plan for the round after the one this node, taking part in the rounds, follows
        (past round 1): the plans the turn and roster checks apply to."""
        return self.phase == "enrolled" and bool(self._followed) and state.round_no == self._followed + 1

    def _turn_rejection(self, state: MatchmakerState, members: list[str]) -> str | None:
        """Whether a state for the round after the one this node follows must wait for its author's turn.
        Only a node taking part in the rounds, past round 1, checks: the first plan of a new mesh, and the
        states a node that joined later finds, are taken as they come."""
        if not self._checks_next_round(state):
            return None
        opened = self._finished_seen.get(state.round_no)
        open_for = time.monotonic() - opened if opened is not None else None
        return turn_rejection(state, members, open_for, self.settings.takeover_s)

    def rewards(self) -> dict[str, RewardReport]:
        return self._rewards.read(self._learn_entries(REWARD))

    def _learn_entries(self, topic: str) -> dict[str, Entry]:
        ledger = self._ledger()
        return ledger.learn_entries(topic) if ledger is not None else {}

    def _log(self, record: RoundLog) -> RoundLog:
        self.log = [*self.log[-(LOG_ROUNDS - 1):], record]
        return record

    def _count(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    # -- the rounds ------------------------------------------------------------------------------
    def _tick(self) -> None:
        if self.phase != "enrolled":
            return
        if time.monotonic() - self._member_written > self.settings.member_ttl_s / 3:
            self._write_member()
        state = self.current_state()
        plan = state.plan if state is not None else None
        if (state.round_no if state is not None else 0) != self._followed:  # the quorum counts it at once
            self._followed = state.round_no if state is not None else 0
            self._write_member()
        if state is not None:  # what this node did in rounds before the open one no longer matters
            self._acted = {done for done in self._acted if done[0] >= state.round_no}
            self._finished_seen = {r: t for r, t in self._finished_seen.items() if r > state.round_no}
        now_ms = int(time.time() * 1000)
        rewards = self.rewards()
        if plan is not None and now_ms < plan.deadline_ms:
            role = plan.role_of(self.peer_id)
            # (A student that has reported needs nothing more: say, this node restarted after teaching.)
            if (role is not None and role[0] == "teacher" and (plan.round_no, "teacher") not in self._acted
                    and not reported(plan, role[1].student, rewards)):
                self._acted.add((plan.round_no, "teacher"))
                assert self._nursery is not None
                self._nursery.start_soon(self._teach, plan, role[1].student)
        members = self.members()
        if plan is not None and not round_finished(plan, rewards, now_ms, self._gone()):
            return
        round_no = (state.round_no if state is not None else 0) + 1
        if plan is not None and now_ms < plan.created_ms + int(self.settings.round_interval_s * 1000):
            return
        # The round is open for planning: the takeover periods, here and in other members' plans this node
        # checks (`turn_rejection`), count from now.
        seen = self._finished_seen.setdefault(round_no, time.monotonic())
        if len(members) < 2 or self.peer_id not in members:
            return
        order = matchmaker_order(round_no, list(members))
        position = order.index(self.peer_id)
        if time.monotonic() - seen < position * self.settings.takeover_s:
            return
        self._plan_round(state, rewards, list(members.values()), now_ms)

    def _plan_round(self, state: MatchmakerState | None, rewards: dict[str, RewardReport],
                    candidates: list[Candidate], now_ms: int) -> None:
        state = state or MatchmakerState.initial()
        state, rejected = close_round(state, rewards)
        for reason in rejected:
            self._count(reason.split(": ", 1)[-1])
        state = next_plan(state, candidates, self.peer_id, now_ms, self.settings.round_deadline_s)
        state = fit_state(state, STATE_MAX_BYTES)
        self._put(STATE, state.to_dict(), None)
        plan = state.plan
        assert plan is not None
        log.info("event=round_planned round=%d pairs=%s", plan.round_no,
                 ",".join(f"{p.teacher[-6:]}->{p.student[-6:]}" for p in plan.pairs))

    async def _transfer_prompts(self, seed: int) -> list[str]:
        """This round's public prompts: drawn from the given transfer set if there is one, else generated."""
        s = self.settings
        if not s.transfer_file:
            return tasks.transfer_set(s.transfer_prompts, seed, s.task_family)
        # Read again when the file changes (the user may replace it), off the trio loop: up to 64 MiB.
        path = Path(s.transfer_file)
        try:
            found = await trio.to_thread.run_sync(path.stat)
        except OSError as exc:
            raise tasks.DataError(f"cannot read {path}: {exc.strerror}") from None
        key = (seed, str(path), found.st_mtime_ns, found.st_size)
        if self._prompts_read is None or self._prompts_read[0] != key:
            given = await trio.to_thread.run_sync(tasks.load_prompts, path)
            self._prompts_read = (key, tasks.sample_prompts(given, s.transfer_prompts, seed))
        return list(self._prompts_read[1])

    async def _teach(self, plan: Any, student: str) -> None:
        """Answer the public transfer set with the live adapter and send it to the student."""
        s = self.settings
        record = self._log(RoundLog(plan.round_no, "teacher", student))
        try:
            engine = self._engine()
            prompts = await self._transfer_prompts(plan.transfer_seed)
            answers = await learner.teacher_answers(engine, LIVE_ADAPTER, prompts, s.max_tokens,
                                                    seed=plan.round_no * 7919, votes=s.teacher_votes)
            transfer = TransferSet(plan.round_no, self.peer_id, student, tuple(zip(prompts, answers, strict=True)))
            payload = sign_payload(self.key_pair, TRANSFER_TOPIC, transfer.to_bytes(),
                                   recipient=PeerID.from_base58(student))
            deadline = min(plan.deadline_ms / 1000 - time.time(), TRANSFER_TIMEOUT_S * 5)
            with trio.move_on_after(max(1.0, deadline)):
                while True:
                    try:
                        reply = await self.rpc.call(PeerID.from_base58(student), METHOD_TRANSFER,
                                                    TransferCall(round_no=plan.round_no, payload=payload),
                                                    timeout=TRANSFER_TIMEOUT_S, response_model=TransferReply)
                        record.detail = {"sent": len(answers), "answered": sum(1 for a in answers if a),
                                         "accepted": reply.accepted, "detail": reply.detail}
                        return
                    except RpcError as exc:
                        record.detail = {"error": f"{exc.code.name.lower()}: {exc}"}
                        if exc.code in (ErrorCode.UNAUTHORIZED, ErrorCode.BAD_REQUEST):
                            return
                    await trio.sleep(2.0)
        except Exception as exc:  # a teacher that cannot teach leaves the round to its deadline
            record.detail = {"error": describe(exc)}
            log.warning('event=teach_failed round=%d reason="%s"', plan.round_no, record.detail["error"])

    async def _handle_transfer(self, request: TransferCall, ctx: Any) -> TransferReply:
        sender = str(ctx.peer_id)
        try:
            envelope = verify_detached(request.payload, topic=TRANSFER_TOPIC, sender=ctx.peer_id,
                                       recipient=PeerID.from_base58(self.peer_id), max_age_s=3600)
            transfer = TransferSet.from_bytes(envelope.body)
        except RpcError:
            self._count("transfer with a bad signature")
            raise
        except TransferError as exc:
            self._count("malformed transfer set")
            raise RpcError(ErrorCode.BAD_REQUEST, str(exc)) from None
        if transfer.round_no != request.round_no or transfer.teacher != sender or transfer.student != self.peer_id:
            self._count("transfer set naming other parties")
            raise RpcError(ErrorCode.BAD_REQUEST, "the transfer set names another round, teacher or student")
        state = self.current_state()
        timing = round_timing(state.plan if state else None, transfer.round_no)
        if timing == "ahead":  # the plan has not reached this node yet (or never will): the teacher tries again
            raise RpcError(ErrorCode.UNAVAILABLE, f"round {transfer.round_no} is not open here yet")
        if timing == "over":
            self._count("transfer for a round that is over")
            raise RpcError(ErrorCode.BAD_REQUEST, f"round {transfer.round_no} is over")
        reason = check_transfer(state.plan if state else None, sender, self.peer_id, transfer.round_no)
        if reason is not None:
            self._count("transfer from a node that is not the assigned teacher")
            raise RpcError(ErrorCode.UNAUTHORIZED, reason)
        # Only answers to the round's public prompts: anything else would be a teacher choosing the student's
        # training data. (Checked after the sender, so that no other node can make this one read its file.)
        try:
            public = set(await self._transfer_prompts(transfer_seed_of(transfer.round_no)))
        except tasks.DataError as exc:
            raise RpcError(ErrorCode.UNAVAILABLE, f"this node cannot read its transfer set: {exc}") from None
        foreign = sum(prompt not in public for prompt, _ in transfer.items)
        if foreign:
            self._count("transfer with prompts outside the public set")
            raise RpcError(ErrorCode.BAD_REQUEST,
                           f"{foreign} of {len(transfer.items)} prompts are not this round's public transfer prompts")
        if self.phase != "enrolled":
            raise RpcError(ErrorCode.UNAVAILABLE, "this node takes part in no rounds")
        if (transfer.round_no, "student") in self._acted:
            return TransferReply(accepted=True, detail="already received")
        self._acted.add((transfer.round_no, "student"))
        assert self._nursery is not None and state is not None and state.plan is not None
        self._nursery.start_soon(self._study, transfer, state.plan.alpha)
        return TransferReply(accepted=True, detail=f"training on {len(transfer.items)} answers")

    async def _study(self, transfer: TransferSet, alpha: float) -> None:
        """Train a shadow on own data mixed with the teacher's answers; report its gain and loss drop."""
        record = self._log(RoundLog(transfer.round_no, "student", transfer.teacher))
        try:
            async with self._training:
                engine = self._engine()
                teacher = self._member_records().get(transfer.teacher)
                if teacher is None:  # its skills unknown: only answers of no known category are kept
                    self._count("transfer from a teacher with no member record")
                own = self.evaluation.skills if self.evaluation else {}
                answers = tasks.answers_worth_learning(transfer.items, teacher.skills if teacher else {}, own)
                examples = learner.mixed_examples(self.train, answers, alpha)
                outcome = await self._train_and_keep(engine, examples, self.settings.round_steps)
                if outcome.swapped:
                    self._on_skills(dict(outcome.skills))
            reward = RewardReport(transfer.round_no, self.peer_id, transfer.teacher,
                                  max(-MAX_GAIN, min(MAX_GAIN, outcome.gain)), outcome.accuracy_after,
                                  outcome.swapped, max(-MAX_LOSS_DROP, min(MAX_LOSS_DROP, outcome.loss_drop)))
            self._put(REWARD, reward.to_dict(), None)
            self._write_member()
            record.detail = {**outcome.to_dict(), "alpha": alpha, "answers_used": len(answers),
                             "answers_received": len(transfer.items)}
            log.info("event=studied round=%d gain=%.3f loss_drop=%.4f swapped=%s", transfer.round_no,
                     outcome.gain, outcome.loss_drop, outcome.swapped)
        except Exception as exc:  # no reward: the round closes at its deadline without this pair
            record.detail = {"error": describe(exc)}
            log.warning('event=study_failed round=%d reason="%s"', transfer.round_no, record.detail["error"])

    # -- views -----------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        state = self.current_state()
        plan = state.plan if state is not None else None
        role = plan.role_of(self.peer_id) if plan is not None else None
        return {
            "phase": self.phase,
            "adapter": LIVE_ADAPTER,
            "examples": {"train": len(self.train), "validation": self.own_validation,
                         "shared_validation": self.shared_val},
            "accuracy": self.evaluation.accuracy if self.evaluation else None,
            "skills": dict(self.evaluation.skills) if self.evaluation else {},
            "local_training": self.local_outcome,
            "rejoined_after_restart": self.rejoined,
            "members": sorted(self.members()),
            "round": state.round_no if state is not None else 0,
            "role": {"role": role[0], "teacher": role[1].teacher, "student": role[1].student} if role else None,
            "rejected": dict(self.rejected),
            "states_checked": self.states_checked,
            "last_error": self.last_error,
        }

    def rounds_view(self, explain: bool = False) -> dict[str, Any]:
        state = self.current_state()
        out: dict[str, Any] = {
            "round": state.round_no if state is not None else 0,
            "history": [r.to_dict() for r in state.history] if state is not None else [],
            "open": state.plan.to_dict() if state is not None and state.plan is not None else None,
            "this_node": [{"round": r.round_no, "role": r.role, "partner": r.partner, **r.detail} for r in self.log],
        }
        if explain:
            out["explain"] = self.explain(state)
        return out

    def explain(self, state: MatchmakerState | None) -> list[dict[str, Any]]:
        """How the matchmaker scores every teacher -> student pair of the current members now."""
        from knexa.node.learn.linucb import oriented, teacher_lead

        state = state or MatchmakerState.initial()
        members = sorted(self.members().values(), key=lambda c: c.peer_id)
        rows = []
        next_round = state.round_no + 1
        for i, first in enumerate(members):
            for second in members[i + 1 :]:
                teacher, student = oriented(first, second)
                score = state.bandit.score(pair_context(teacher.vector, student.vector), next_round)
                rows.append({"teacher": teacher.peer_id, "student": student.peer_id, "mean": score.mean,
                             "width": score.width, "ucb": score.ucb,
                             "lead": teacher_lead(teacher.vector, student.vector)})
        rows.sort(key=lambda r: -r["ucb"])
        return rows
