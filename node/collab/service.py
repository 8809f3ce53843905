"""The collaboration protocol unit: RPC handlers and the origin's rounds, over the pure modules beside it.

- worker side: `collab.propose` runs one job on the local engine behind admission control and a bounded
  queue; `collab.bid` answers a task beacon with the node's self-score and load.
- origin side: `ask_moa` (mixture of agents: K peers, M proposer layers, aggregation here) and `ask_vote`
  (beacon, the best-scoring nodes execute, weighted vote). Every wait has a deadline.
- verification: a sampled share of peers' answers from the model this node also serves is re-scored in one
  forward pass; a failed check writes a signed reputation report into the ledger.
"""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio
from libp2p.peer.id import ID as PeerID
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from knexa.net.rpc import ErrorCode, RpcError, RpcService
from knexa.node.collab.admission import AdmissionController, Overloaded
from knexa.node.collab.moa import (
    MIN_REPUTATION,
    Candidate,
    ReachMemory,
    RoundState,
    aggregate_messages,
    layer_messages,
    rank_peers,
    select_peers,
)
from knexa.node.collab.verify import PeerTally, Verdict, VerifyPolicy, judge, model_fingerprint, should_check
from knexa.node.collab.vote import Ballot, Bid, choose_executors, cosine, final_answer, weighted_vote
from knexa.node.collab.wire import (
    METHOD_BID,
    METHOD_PROPOSE,
    BidCall,
    BidReply,
    ProposeCall,
    ProposeReply,
    overloaded_message,
    retry_after_of,
)
from knexa.node.inference_wire import GenerateParams, Message

if TYPE_CHECKING:
    from knexa.crdt.ledger import Ledger
    from knexa.node.inference import InferenceService

log = logging.getLogger("knexa.collab")

VERIFY_QUEUE = 64
REPORT_EVERY_PASSES = 10
BID_TIMEOUT_S = 5.0


@dataclass
class CollabSettings:
    bound: float = 0.8
    max_queue: int = 8
    concurrency: int = 1
    window_s: float = 2.0
    admission: bool = True
    verify: VerifyPolicy = field(default_factory=VerifyPolicy)
    layer_deadline_s: float = 60.0
    min_reputation: float = MIN_REPUTATION
    skills: dict[str, float] = field(default_factory=dict)
    max_beacons: int = 16  # peers a vote's beacon goes to (the least loaded first)


class CollabError(Exception):
    """A collaborative request failed as a whole; `code` is overloaded, no_peers, no_answers or bad_request."""

    def __init__(self, code: str, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.retry_after_s = retry_after_s


@dataclass
class _VerifyJob:
    peer_id: str
    messages: list[dict[str, str]]
    params: GenerateParams
    reply: ProposeReply


@dataclass
class VerifyCounters:
    checks: int = 0
    failures: int = 0
    skipped: int = 0
    errors: int = 0
    seconds: float = 0.0


class CollabService:
    def __init__(
        self,
        rpc: RpcService,
        peer_id: str,
        inference: InferenceService | None,
        ledger: Callable[[], Ledger | None],
        publish_report: Callable[[str, float, str], None],
        connected_peers: Callable[[], list[str]],
        settings: CollabSettings | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.rpc = rpc
        self.peer_id = peer_id
        self.inference = inference
        self._ledger = ledger
        self._publish_report = publish_report
        self._connected_peers = connected_peers
        self.settings = settings or CollabSettings()
        s = self.settings
        self.admission = AdmissionController(
            bound=s.bound, max_queue=s.max_queue, concurrency=s.concurrency, window_s=s.window_s, enabled=s.admission
        )
        self.rng = rng or random.Random()
        self._slots = trio.Semaphore(s.concurrency)
        self.verify_counters = VerifyCounters()
        self.tallies: dict[str, PeerTally] = {}
        self.rounds = {"moa": 0, "vote": 0, "failed": 0}
        self.reach = ReachMemory()
        self._verify_send, self._verify_receive = trio.open_memory_channel[_VerifyJob](VERIFY_QUEUE)
        rpc.register(METHOD_PROPOSE, self._handle_propose, ProposeCall, ProposeReply)
        rpc.register(METHOD_BID, self._handle_bid, BidCall, BidReply)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async for job in self._verify_receive:
            try:
                await self.verify_answer(job.peer_id, job.messages, job.params, job.reply)
            except Exception as exc:  # one failed check must not stop the verifier
                self.verify_counters.errors += 1
                log.warning('event=verify_error peer=%s reason="%s"', job.peer_id, exc)

    # -- what this node is -------------------------------------------------------------------------
    def _own_identity(self) -> dict[str, Any] | None:
        if self.inference is None:
            return None
        status = self.inference.status()
        return status.get("model") if status.get("state") == "ready" else None

    def own_model(self) -> str | None:
        identity = self._own_identity()
        return identity["name"] if identity else None

    def own_fingerprint(self) -> str | None:
        identity = self._own_identity()
        return model_fingerprint(identity) if identity else None

    def stats(self) -> dict[str, Any]:
        v = self.verify_counters
        return {
            **self.admission.stats(trio.current_time()),
            "rounds": dict(self.rounds),
            "verification": {
                "fraction": self.settings.verify.fraction,
                "checks": v.checks, "failures": v.failures, "skipped": v.skipped, "errors": v.errors,
                "seconds": round(v.seconds, 3),
                "peers": {p: {"checked": t.checked, "failed": t.failed} for p, t in self.tallies.items()},
            },
            "skills": dict(self.settings.skills),
        }

    def register_metrics(self, registry: CollectorRegistry) -> None:
        registry.register(_CollabCollector(self))

    # -- worker side -------------------------------------------------------------------------------
    async def run_job(
        self, messages: list[dict[str, str]], params: GenerateParams, *, force: bool = False
    ) -> ProposeReply:
        """One job on the local engine behind admission and the bounded queue. Raises CollabError."""
        from knexa.node.engine import EngineError, GenerationRequest
        from knexa.node.inference import to_engine_request
        from knexa.node.inference_wire import GenerateCall

        if self.inference is None:
            raise CollabError("unavailable", "this node runs no model")
        admitted_at = trio.current_time()
        refusal = self.admission.admit_job(admitted_at, force=force)
        if isinstance(refusal, Overloaded):
            raise CollabError("overloaded", refusal.reason, refusal.retry_after_s)
        service_time: float | None = None
        try:
            async with self._slots:
                started = trio.current_time()
                request: GenerationRequest = to_engine_request(
                    GenerateCall(messages=[Message(**m) for m in messages], params=params)
                )
                try:
                    result = await self.inference.require_engine().generate(request)
                except EngineError as exc:
                    code = "overloaded" if exc.code == "overloaded" else "engine"
                    raise CollabError(code, f"{exc.code}: {exc}", 1.0 if code == "overloaded" else None) from exc
                service_time = trio.current_time() - started
        finally:
            self.admission.job_done(service_time)
        return ProposeReply(
            text=result.text, token_ids=list(result.token_ids), model=self.own_model() or "",
            model_fingerprint=self.own_fingerprint() or "",
            finish_reason=result.finish_reason, queue_time_s=started - admitted_at, service_time_s=service_time,
        )

    async def _handle_propose(self, call: ProposeCall, ctx: Any) -> ProposeReply:
        try:
            return await self.run_job([m.model_dump() for m in call.messages], call.params)
        except CollabError as exc:
            if exc.code == "overloaded":
                raise RpcError(ErrorCode.OVERLOADED, overloaded_message(exc.retry_after_s or 1.0, str(exc))) from None
            if exc.code == "unavailable":
                raise RpcError(ErrorCode.UNAVAILABLE, str(exc)) from None
            from knexa.node.engine import EngineError
            from knexa.node.inference import rpc_error_for

            if isinstance(exc.__cause__, EngineError):  # the engine's own codes: bad request, down, ...
                raise rpc_error_for(exc.__cause__) from None
            raise RpcError(ErrorCode.INTERNAL, str(exc)) from None

    def own_bid(self, requirement: dict[str, float]) -> Bid:
        return Bid(self.peer_id, cosine(self.settings.skills, requirement), self.admission.queue_length)

    async def _handle_bid(self, call: BidCall, ctx: Any) -> BidReply:
        bid = self.own_bid(call.requirement)
        return BidReply(score=bid.score, queue_length=bid.queue_length, model=self.own_model())

    # -- peers as the ledger shows them ------------------------------------------------------------
    def candidates(self) -> list[Candidate]:
        """Every peer with a live ledger profile that serves a model: connected ones, and the others the RPC
        layer dials when asked (through the peerstore, the DHT or the peer's relay), except those that could
        not be reached lately (a dead peer's profile lives on until it expires)."""
        ledger = self._ledger()
        if ledger is None:
            return []
        connected = set(self._connected_peers())
        now = trio.current_time()
        serving = {peer: profile for peer, profile in ledger.profiles().items()
                   if peer != self.peer_id and profile.models and not self.reach.blocked(peer, now)}
        reputations = ledger.reputations(serving)
        return [
            Candidate(
                peer_id=peer, models=tuple(m.name for m in profile.models), queue_length=profile.load.queue_length,
                reputation=reputations[peer].score,
                mean_service_time_s=profile.throughput.mean_service_time_s, connected=peer in connected,
            )
            for peer, profile in serving.items()
        ]

    def _note_reach(self, peer_id: str, failure: BaseException | None) -> None:
        if failure is None:
            self.reach.reached(peer_id)
        elif _unreachable(failure) or peer_id not in self._connected_peers():
            # Also a call that timed out with no connection opened: the dial itself hung.
            self.reach.failed(peer_id, trio.current_time())

    # -- asking one peer -------------------------------------------------------------------------
    async def ask_peer(
        self, peer_id: str, round_id: str, layer: int, messages: list[dict[str, str]], params: GenerateParams,
        timeout_s: float,
    ) -> ProposeReply:
        """One proposal from a peer over signed RPC; the answer is queued for verification if sampled."""
        call = ProposeCall(round_id=round_id, layer=layer, messages=[Message(**m) for m in messages], params=params)
        reply = await self.rpc.call(
            PeerID.from_base58(peer_id), METHOD_PROPOSE, call, timeout=timeout_s, response_model=ProposeReply
        )
        if should_check(self.settings.verify, self.rng, self.own_fingerprint(), reply.model_fingerprint):
            try:
                self._verify_send.send_nowait(_VerifyJob(peer_id, messages, params, reply))
            except trio.WouldBlock:
                self.verify_counters.skipped += 1  # the verifier is behind: skip, never queue without bound
        return reply

    async def _propose(
        self, state: RoundState, layer: int, participant: str, messages: list[dict[str, str]],
        params: GenerateParams, deadline: float,
    ) -> None:
        """One participant's proposal in a layer; a failed peer is replaced by a spare while time remains."""
        started = trio.current_time()
        try:
            if participant == self.peer_id:
                reply = await self.run_job(messages, params, force=True)
            else:
                reply = await self.ask_peer(participant, state.round_id, layer, messages, params, deadline - started)
        except (RpcError, CollabError, OSError, trio.BrokenResourceError) as exc:
            if participant != self.peer_id:
                self._note_reach(participant, exc)
            state.record_miss(layer, participant, _reason(exc))
            log.info('event=moa_peer_failed peer=%s layer=%d reason="%s"', participant, layer, _reason(exc))
            if participant == self.peer_id:
                return
            spare = state.replace(participant)
            if spare is not None and trio.current_time() < deadline:
                await self._propose(state, layer, spare, messages, params, deadline)
            return
        if participant != self.peer_id:
            self._note_reach(participant, None)
        state.record_answer(layer, participant, reply.text, reply.model, trio.current_time() - started)

    async def _run_layer(
        self, state: RoundState, layer: int, participants: list[str], messages: list[dict[str, str]],
        params: GenerateParams, deadline_s: float,
    ) -> None:
        deadline = trio.current_time() + deadline_s
        with trio.move_on_at(deadline):
            async with trio.open_nursery() as nursery:
                for participant in participants:
                    nursery.start_soon(self._propose, state, layer, participant, messages, params, deadline)
        answered = {c.peer_id for c in state.contributions if c.layer == layer}
        missed = {x.peer_id for x in state.misses if x.layer == layer}
        for participant in state.peers + ([self.peer_id] if self.peer_id in participants else []):
            if participant not in answered and participant not in missed:
                state.record_miss(layer, participant, "deadline")

    # -- mixture of agents -------------------------------------------------------------------------
    async def ask_moa(
        self, messages: list[dict[str, str]], k: int, m: int, params: GenerateParams,
        layer_deadline_s: float | None = None,
    ) -> dict[str, Any]:
        """One mixture-of-agents round from this node. Raises CollabError (overloaded with a retry-after)."""
        if k < 1 or m < 1:
            raise CollabError("bad_request", "K and M must be at least 1")
        layer_deadline_s = layer_deadline_s or self.settings.layer_deadline_s
        began = trio.current_time()
        ranked = rank_peers(self.candidates(), self.rng, min_reputation=self.settings.min_reputation)
        own = self.own_model() is not None
        if not ranked and not own:
            raise CollabError("no_peers", "no peer in the ledger serves a model and this node runs none")
        alpha_max = max((c.mean_service_time_s for c in ranked[:k]), default=0.0)
        plan = self.admission.plan_round(began, k, m, alpha_s=alpha_max)
        if isinstance(plan, Overloaded):
            self.rounds["failed"] += 1
            raise CollabError("overloaded", plan.reason, plan.retry_after_s)
        chosen = [c.peer_id for c in ranked[: plan.k]]
        state = RoundState(
            self.peer_id, plan.k, plan.m, peers=chosen, spares=[c.peer_id for c in ranked[plan.k:]],
            round_id=uuid.uuid4().hex[:16],
        )
        for layer in range(plan.m):
            prompt = layer_messages(messages, state.previous_answers(layer))
            participants = ([self.peer_id] if own else []) + list(state.peers)
            await self._run_layer(state, layer, participants, prompt, params, layer_deadline_s)
        final_answers = state.previous_answers(plan.m)
        if not final_answers:
            self.rounds["failed"] += 1
            raise CollabError("no_answers", "no proposer answered within the deadline in any layer")
        text, aggregator = await self._aggregate(state, messages, final_answers, params, layer_deadline_s)
        self.rounds["moa"] += 1
        return {
            "mode": "moa", "text": text, "aggregator": aggregator, "k_requested": k, "m_requested": m,
            "degraded": plan.degraded, "rho": round(plan.rho, 4), **state.summary(),
            "elapsed_s": round(trio.current_time() - began, 3),
        }

    async def _aggregate(
        self, state: RoundState, question: list[dict[str, str]], answers: list[str], params: GenerateParams,
        deadline_s: float,
    ) -> tuple[str, str | None]:
        """Aggregate at the origin (or, with no local model, at the first peer that answered); if that fails
        the first answer of the last layer stands."""
        prompt = aggregate_messages(question, answers)
        if len(answers) == 1:
            return answers[0], None
        # Proposers may sample for diversity; the synthesis is greedy, so one set of answers gives one result.
        params = params.model_copy(update={"temperature": 0.0, "seed": None})
        aggregators = [self.peer_id] if self.own_model() else [p for p in state.contributors() if p in state.peers]
        for aggregator in aggregators[:2]:
            try:
                with trio.fail_after(deadline_s):
                    if aggregator == self.peer_id:
                        reply = await self.run_job(prompt, params, force=True)
                    else:
                        reply = await self.ask_peer(aggregator, state.round_id, state.m, prompt, params, deadline_s)
                return reply.text, aggregator
            except (RpcError, CollabError, trio.TooSlowError, OSError) as exc:
                state.record_miss(state.m, aggregator, f"aggregation: {_reason(exc)}")
        return answers[0], None

    # -- beacon allocation and weighted vote -------------------------------------------------------
    async def ask_vote(
        self, messages: list[dict[str, str]], requirement: dict[str, float], n: int, params: GenerateParams,
        deadline_s: float | None = None,
    ) -> dict[str, Any]:
        """Beacon to the peers with a model (the least loaded `max_beacons` of them, connected or known from the
        ledger) and this node; the n best-scoring execute; the answers' final results are combined by a vote
        weighted by the executors' scores."""
        if n < 1:
            raise CollabError("bad_request", "at least one executor is needed")
        deadline_s = deadline_s or self.settings.layer_deadline_s
        began = trio.current_time()
        task_id = uuid.uuid4().hex[:16]
        peers = [c.peer_id for c in select_peers(self.candidates(), self.settings.max_beacons, self.rng,
                                                 min_reputation=self.settings.min_reputation)]
        bids: list[Bid] = [self.own_bid(requirement)] if self.own_model() else []

        async def collect_bid(peer: str) -> None:
            try:
                reply = await self.rpc.call(
                    PeerID.from_base58(peer), METHOD_BID, BidCall(task_id=task_id, requirement=requirement),
                    timeout=min(BID_TIMEOUT_S, deadline_s), response_model=BidReply,
                )
            except (RpcError, OSError) as exc:
                self._note_reach(peer, exc)
                log.info('event=bid_failed peer=%s reason="%s"', peer, _reason(exc))
                return
            self._note_reach(peer, None)
            if reply.model:
                bids.append(Bid(peer, reply.score, reply.queue_length))

        async with trio.open_nursery() as nursery:
            for peer in peers:
                nursery.start_soon(collect_bid, peer)
        executors = choose_executors(bids, n)
        if not executors:
            raise CollabError("no_peers", "no node answered the beacon")
        state = RoundState(
            self.peer_id, len(executors), 1, peers=[b.peer_id for b in executors if b.peer_id != self.peer_id],
            spares=[], round_id=task_id,
        )
        await self._run_layer(state, 0, [b.peer_id for b in executors], messages, params, deadline_s)
        weights = {b.peer_id: b.score for b in executors}
        ballots = [Ballot(c.peer_id, final_answer(c.text), weights[c.peer_id]) for c in state.contributions]
        outcome = weighted_vote(ballots)
        if outcome.answer is None:
            self.rounds["failed"] += 1
            raise CollabError("no_answers", "no executor gave an answer with a final result within the deadline")
        best = max(outcome.supporters, key=lambda p: weights[p])
        text = next(c.text for c in state.contributions if c.peer_id == best)
        self.rounds["vote"] += 1
        return {
            "mode": "vote", "text": text, "answer": outcome.answer, "task_id": task_id,
            "totals": outcome.totals, "supporters": outcome.supporters,
            "bids": [{"peer_id": b.peer_id, "score": round(b.score, 4), "queue_length": b.queue_length} for b in bids],
            "ballots": [{"peer_id": b.peer_id, "answer": b.answer, "weight": round(b.weight, 4)} for b in ballots],
            "contributors": state.contributors(),
            "missed": state.summary()["missed"],
            "elapsed_s": round(trio.current_time() - began, 3),
        }

    # -- verification ------------------------------------------------------------------------------
    async def verify_answer(
        self, peer_id: str, messages: list[dict[str, str]], params: GenerateParams, reply: ProposeReply
    ) -> Verdict | None:
        """Re-score a peer's answer with the local model; None when the check could not run (not a failure)."""
        from knexa.node.engine import ContextLengthExceeded, EngineError, InvalidRequest

        if self.inference is None or self.own_fingerprint() != reply.model_fingerprint:
            self.verify_counters.skipped += 1
            return None
        engine = self.inference.require_engine()
        started = trio.current_time()
        tokenizer = engine.tokenizer()
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt_ids = list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
        verdict: Verdict
        if not reply.token_ids:
            verdict = Verdict(False, 0, 0, None, "the answer claims no tokens")
        elif not params.stop and _decoded(tokenizer, reply.token_ids) != reply.text.strip():
            verdict = Verdict(False, len(reply.token_ids), 0, None, "the text does not match the claimed tokens")
        else:
            try:
                scored = await engine.score(prompt_ids, reply.token_ids)
            except ContextLengthExceeded:
                self.verify_counters.skipped += 1
                return None
            except InvalidRequest as exc:  # e.g. token ids outside our vocabulary: not our model's output
                verdict = Verdict(False, len(reply.token_ids), len(reply.token_ids), 0, f"unscorable tokens: {exc}")
            except EngineError:
                self.verify_counters.skipped += 1  # busy or down: a check not run proves nothing
                return None
            else:
                verdict = judge(
                    self.settings.verify, greedy=params.temperature == 0, claimed_token_ids=reply.token_ids,
                    scored_token_ids=scored.token_ids, logprobs=scored.logprobs,
                    argmax_token_ids=scored.argmax_token_ids, argmax_logprobs=scored.argmax_logprobs,
                )
        self.verify_counters.seconds += trio.current_time() - started
        self._record_verdict(peer_id, verdict)
        return verdict

    def _record_verdict(self, peer_id: str, verdict: Verdict) -> None:
        self.verify_counters.checks += 1
        tally = self.tallies.setdefault(peer_id, PeerTally())
        had_failures = tally.failed > 0
        tally.add(verdict.passed)
        if not verdict.passed:
            self.verify_counters.failures += 1
            log.warning('event=verify_failed peer=%s reason="%s"', peer_id, verdict.reason)
        if not verdict.passed or had_failures or tally.checked % REPORT_EVERY_PASSES == 0:
            reason = f"verification: {tally.failed} of {tally.checked} checks failed; last: {verdict.reason}"
            self._publish_report(peer_id, tally.score, reason[:256])


class _CollabCollector(Collector):
    """Admission and verification counters, read at scrape time."""

    def __init__(self, service: CollabService) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        s = self.service
        a, v = s.admission, s.verify_counters
        now = trio.current_time() if _in_trio() else 0.0
        yield GaugeMetricFamily("knexa_collab_queue_length", "Collaborative jobs admitted, waiting or running",
                                a.queue_length)
        yield GaugeMetricFamily("knexa_collab_admitted_rate", "Collaborative jobs admitted per second (window)",
                                a.admitted_rate(now) if now else 0.0)
        yield CounterMetricFamily("knexa_collab_admitted", "Collaborative jobs admitted", a.admitted_total)
        yield CounterMetricFamily("knexa_collab_rejected", "Collaborative jobs refused as overloaded", a.rejected_total)
        yield CounterMetricFamily("knexa_collab_rounds_degraded", "Rounds run with a lower K or M", a.rounds_degraded)
        yield CounterMetricFamily("knexa_collab_rounds_rejected", "Rounds refused as overloaded", a.rounds_rejected)
        yield CounterMetricFamily("knexa_verify_checks", "Peer answers re-scored", v.checks)
        yield CounterMetricFamily("knexa_verify_failures", "Peer answers that failed verification", v.failures)


def _in_trio() -> bool:
    try:
        trio.current_time()
    except RuntimeError:
        return False
    return True


def _decoded(tokenizer: Any, token_ids: list[int]) -> str | None:
    try:
        return str(tokenizer.decode(token_ids, skip_special_tokens=True)).strip()
    except Exception:  # ids outside the vocabulary: what the score pass then reports
        return None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, RpcError):
        after = retry_after_of(exc.message)
        return f"{exc.code.name.lower()}" + (f" (retry after {after:.2f}s)" if after is not None else "") + (
            f": {exc.message}" if exc.message and after is None else ""
        )
    return f"{type(exc).__name__}: {exc}"


def _unreachable(exc: BaseException) -> bool:
    """A failure that says the peer could not be reached at all (no dial, no stream), not that it refused,
    erred or was slow."""
    if isinstance(exc, RpcError):
        return exc.code == ErrorCode.UNAVAILABLE
    return isinstance(exc, OSError | trio.BrokenResourceError)
