"""The collaboration protocols' pure parts: admission, MoA round state, voting, verification verdicts."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from knexa.node.collab.admission import AdmissionController, Overloaded, RateWindow, RoundPlan, utilisation
from knexa.node.collab.moa import (
    Candidate,
    ReachMemory,
    RoundState,
    aggregate_messages,
    layer_messages,
    rank_peers,
    select_peers,
)
from knexa.node.collab.verify import PeerTally, VerifyPolicy, judge, model_fingerprint, should_check
from knexa.node.collab.vote import (
    Ballot,
    Bid,
    choose_executors,
    cosine,
    final_answer,
    parse_requirement,
    weighted_vote,
)
from knexa.node.collab.wire import MAX_TEXT_CHARS, BidCall, ProposeReply, overloaded_message, retry_after_of

# -- admission -----------------------------------------------------------------------------------


def _controller(alpha: float, **kwargs) -> AdmissionController:
    controller = AdmissionController(**kwargs)
    controller.service.add(alpha)
    return controller


def test_utilisation_is_the_distributed_moa_formula():
    assert utilisation(0.1, 2, 2, 0.5) == pytest.approx(0.1 * 7 * 0.5)


def test_round_plan_lowers_k_first_then_m_then_refuses():
    # alpha 0.1 s, window 10 s: rate with this round = (n + 1) / 10.
    controller = _controller(0.1, window_s=10.0)
    plan = controller.plan_round(0.0, 3, 2, alpha_s=None)
    assert plan == RoundPlan(3, 2, pytest.approx(0.1 * 9 * 0.1), degraded=False)
    for _ in range(7):  # 8 rounds in the window: rate 0.9 with the next
        controller.started_rounds.add(0.0)
    plan = controller.plan_round(0.0, 3, 2)
    # K=3,M=2: 9 jobs -> 0.81; K=2: 7 -> 0.63 < 0.8
    assert isinstance(plan, RoundPlan) and (plan.k, plan.m) == (2, 2) and plan.degraded
    for _ in range(10):
        controller.started_rounds.add(0.0)
    plan = controller.plan_round(0.0, 3, 2)  # rate 2.0: K=1,M=2 -> 1.0; K=1,M=1 -> 0.6
    assert isinstance(plan, RoundPlan) and (plan.k, plan.m) == (1, 1)
    for _ in range(20):
        controller.started_rounds.add(1.0)
    refusal = controller.plan_round(1.0, 3, 2)
    assert isinstance(refusal, Overloaded) and refusal.retry_after_s > 0
    assert controller.rounds_rejected == 1 and controller.rounds_degraded == 2
    # After the retry-after the smallest round fits again.
    later = controller.plan_round(1.0 + refusal.retry_after_s + 1e-6, 1, 1)
    assert isinstance(later, RoundPlan)


def test_slowest_peer_sets_alpha_for_mixed_hardware():
    controller = _controller(0.01, window_s=10.0)
    for _ in range(9):
        controller.started_rounds.add(0.0)
    plan = controller.plan_round(0.0, 2, 1)  # own alpha: 0.01 * 4 jobs * 1 round/s
    assert isinstance(plan, RoundPlan) and plan.k == 2
    plan = controller.plan_round(0.0, 2, 1, alpha_s=0.2)  # 0.2 * 4 * 1.1/s >= 0.8; K=1: 0.2 * 3 * 1.1 = 0.66
    assert isinstance(plan, RoundPlan) and plan.k == 1


def test_slow_jobs_stretch_the_window():
    # A 25 s job measured over a 2 s window would read as rho 12 and refuse everything after it.
    controller = _controller(25.0, window_s=2.0)
    assert controller.admit_job(0.0) is None
    controller.job_done(25.0)
    assert controller.admit_job(25.0) is None
    assert controller.window_for(25.0) == pytest.approx(5 * 25.0 / 0.8)


def test_job_admission_refuses_at_the_bound_and_when_the_queue_is_full():
    controller = _controller(0.1, window_s=1.0, max_queue=3)
    now = 0.0
    admitted = 0
    while controller.admit_job(now) is None:
        admitted += 1
        controller.job_done(0.1)
        now += 0.01
    # alpha 0.1 and a 1 s window: at most 7 jobs keep 0.1 * (n + 1) under 0.8
    assert admitted == 7 and controller.rejected_total == 1
    refusal = controller.admit_job(now)
    assert isinstance(refusal, Overloaded)
    assert controller.admit_job(now + refusal.retry_after_s + 1e-6) is None
    full = _controller(0.01, window_s=100.0, max_queue=3)
    for _ in range(3):
        assert full.admit_job(0.0) is None
    refusal = full.admit_job(0.0)
    assert isinstance(refusal, Overloaded) and "queue full" in refusal.reason
    full.job_done(None)
    assert full.admit_job(0.0) is None


def test_disabled_admission_admits_everything():
    controller = _controller(1.0, window_s=1.0, max_queue=2, enabled=False)
    for _ in range(50):
        assert controller.admit_job(0.0) is None
    assert controller.queue_length == 50 == controller.max_queue_seen


@settings(max_examples=200, deadline=None)
@given(
    alpha=st.floats(0.001, 2.0),
    gaps=st.lists(st.floats(0.0, 0.5), min_size=1, max_size=300),
    bound=st.floats(0.1, 1.0),
    max_queue=st.integers(1, 20),
)
def test_admitted_load_stays_under_the_bound_and_the_queue_bounded(alpha, gaps, bound, max_queue):
    controller = _controller(alpha, window_s=2.0, bound=bound, max_queue=max_queue)
    now = 0.0
    running: list[float] = []  # finish times of admitted jobs (one server)
    for gap in gaps:
        now += gap
        running = [t for t in running if t > now]
        for _ in range(controller.queue_length - len(running)):
            controller.job_done(alpha)
        if controller.admit_job(now) is None:
            running.append(max(running[-1] if running else now, now) + alpha)
        assert controller.queue_length <= max_queue
        window = controller.window_for(controller.alpha_s)
        assert alpha * controller.admitted_jobs.count(now, window) / window < bound + 1e-9


@given(times=st.lists(st.floats(0, 100), max_size=50), allowed=st.integers(0, 50))
def test_rate_window_wait_until_at_most(times, allowed):
    window = RateWindow()
    for t in sorted(times):
        window.add(t)
    now = max(times, default=0.0)
    wait = window.wait_until_at_most(now, 10.0, allowed)
    assert window.count(now + wait + 1e-9, 10.0) <= allowed


# -- mixture of agents ---------------------------------------------------------------------------


def _candidates() -> list[Candidate]:
    return [
        Candidate("busy", ("m",), queue_length=5, reputation=0.9),
        Candidate("a", ("m",), queue_length=0, reputation=0.5),
        Candidate("b", ("m",), queue_length=0, reputation=0.5),
        Candidate("cheat", ("m",), queue_length=0, reputation=0.2),
        Candidate("nomodel", (), queue_length=0, reputation=0.9),
        Candidate("good", ("m",), queue_length=0, reputation=0.8),
    ]


def test_select_peers_lowest_load_then_reputation_random_among_equals():
    firsts = set()
    for seed in range(40):
        chosen = select_peers(_candidates(), 3, random.Random(seed))
        ids = [c.peer_id for c in chosen]
        assert ids[0] == "good" and set(ids[1:]) == {"a", "b"}
        firsts.add(ids[1])
    assert firsts == {"a", "b"}  # equals come in random order
    ranked = rank_peers(_candidates(), random.Random(0))
    assert [c.peer_id for c in ranked][-1] == "busy" and "cheat" not in [c.peer_id for c in ranked]
    assert select_peers(_candidates(), 5, random.Random(0), model="other") == []


def test_select_peers_prefers_connected_peers_among_equals_only():
    near = Candidate("near", ("m",), 1, 0.9)
    far = Candidate("far", ("m",), 1, 0.9, connected=False)
    idle_far = Candidate("idle-far", ("m",), 0, 0.9, connected=False)
    for seed in range(20):
        ranked = rank_peers([far, near, idle_far], random.Random(seed))
        # Load first: an idle peer is worth a dial; among equals the one already connected.
        assert [c.peer_id for c in ranked] == ["idle-far", "near", "far"]


def test_reach_memory_leaves_an_unreachable_peer_out_for_its_cooldown():
    memory = ReachMemory(cooldown_s=60.0)
    assert not memory.blocked("p", 0.0)
    memory.failed("p", 10.0)
    assert memory.blocked("p", 69.0) and not memory.blocked("q", 69.0)
    assert not memory.blocked("p", 70.0)  # the cooldown is over: tried again
    memory.failed("p", 100.0)
    memory.reached("p")
    assert not memory.blocked("p", 101.0)


def test_layer_prompts_carry_previous_answers_numbered():
    question = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]
    assert layer_messages(question, []) == question
    second = layer_messages(question, ["4", "four"])
    assert second[0] == question[0] and second[1]["content"].startswith("2+2?")
    assert "1. 4" in second[1]["content"] and "2. four" in second[1]["content"]
    final = aggregate_messages(question, ["4", "5"])
    assert final[0]["role"] == "system" and "1. 4" in final[-1]["content"] and len(final) == 2


def test_round_state_replaces_failed_peers_and_names_contributors():
    state = RoundState("origin", 2, 2, peers=["a", "b"], spares=["c"])
    state.record_answer(0, "origin", "x", "m", 0.1)
    state.record_answer(0, "a", "y", "m", 0.1)
    state.record_miss(0, "b", "unavailable")
    assert state.replace("b") == "c" and state.peers == ["a", "c"]
    assert state.replace("a") is None and state.peers == ["c"]
    assert state.previous_answers(1) == ["x", "y"]
    assert state.previous_answers(2) == ["x", "y"]  # layer 1 answered nothing: fall back
    state.record_answer(1, "c", "z", "m", 0.2)
    assert state.contributors() == ["origin", "a", "c"]
    summary = state.summary()
    assert summary["replaced"] == {"b": "c"} and summary["missed"][0]["peer_id"] == "b"


# -- voting --------------------------------------------------------------------------------------


def test_cosine_self_score():
    assert cosine({"math": 1.0}, {"math": 2.0}) == pytest.approx(1.0)
    assert cosine({"math": 1.0}, {"code": 1.0}) == 0.0
    assert cosine({}, {"math": 1.0}) == 0.0
    assert cosine({"math": 0.6, "code": 0.6}, {"math": 1.0}) == pytest.approx(0.7071, abs=1e-4)


def test_parse_requirement_and_bad_input():
    assert parse_requirement("math=1, code=0.5") == {"math": 1.0, "code": 0.5}
    assert parse_requirement("") == {}
    for bad in ("math", "math=x", "=1", "math=-1", "math=nan"):
        with pytest.raises(ValueError):
            parse_requirement(bad)
    with pytest.raises(ValueError):
        BidCall(task_id="t", requirement={"math": float("inf")})


def test_final_answer_extraction():
    assert final_answer("2 + 3 = 5") == "5"
    assert final_answer("The answer is 1,234.") == "1234"
    assert final_answer("It is 2.50") == "2.5"
    assert final_answer("first line\nParis!") == "paris"
    assert final_answer("   ") is None


def test_weighted_vote_beats_a_single_high_scorer():
    ballots = [Ballot("w", "7", 1.0), Ballot("a", "5", 0.95), Ballot("b", "5", 0.7), Ballot("x", None, 5.0)]
    outcome = weighted_vote(ballots)
    assert outcome.answer == "5" and outcome.supporters == ["a", "b"]
    assert outcome.totals == {"7": 1.0, "5": pytest.approx(1.65)}
    assert weighted_vote([]).answer is None
    # ties: more voters, then the answer that sorts first; never order-dependent
    tied = [Ballot("a", "x", 0.5), Ballot("b", "y", 0.25), Ballot("c", "y", 0.25)]
    assert weighted_vote(tied).answer == "y" == weighted_vote(list(reversed(tied))).answer


def test_choose_executors_by_score_then_load():
    bids = [Bid("a", 0.5, 0), Bid("b", 0.9, 3), Bid("c", 0.9, 1), Bid("d", 0.1, 0)]
    assert [b.peer_id for b in choose_executors(bids, 3)] == ["c", "b", "a"]


# -- verification --------------------------------------------------------------------------------


def test_the_fingerprint_tells_weights_tokenizer_and_dtype_apart():
    identity = {"name": "m", "weights_sha256": "a" * 64, "tokenizer_sha256": "b" * 64, "dtype": "float32"}
    same = model_fingerprint(identity)
    assert model_fingerprint({**identity, "name": "renamed"}) == same
    for field, value in (("weights_sha256", "c" * 64), ("tokenizer_sha256", "c" * 64), ("dtype", "bfloat16")):
        assert model_fingerprint({**identity, field: value}) != same


def test_should_check_only_own_model_and_the_fraction():
    rng = random.Random(1)
    assert not should_check(VerifyPolicy(1.0), rng, None, "m")
    assert not should_check(VerifyPolicy(1.0), rng, "m", "other")
    assert should_check(VerifyPolicy(1.0), rng, "m", "m")
    picked = sum(should_check(VerifyPolicy(0.25), rng, "m", "m") for _ in range(4000))
    assert 800 < picked < 1200


def _judge(greedy: bool, claimed, argmax, logprobs, argmax_logprobs, policy=VerifyPolicy()):
    return judge(
        policy, greedy=greedy, claimed_token_ids=claimed, scored_token_ids=claimed, logprobs=logprobs,
        argmax_token_ids=argmax, argmax_logprobs=argmax_logprobs,
    )


def test_greedy_answers_must_follow_the_argmax_up_to_near_ties():
    assert _judge(True, [1, 2, 3], [1, 2, 3], [-0.1, -0.2, -0.3], [-0.1, -0.2, -0.3]).passed
    near_tie = _judge(True, [1, 2, 3], [1, 9, 3], [-0.1, -0.72, -0.3], [-0.1, -0.7, -0.3])
    assert near_tie.passed and near_tie.bad_tokens == 0
    wrong = _judge(True, [1, 2, 3], [1, 9, 3], [-0.1, -3.0, -0.3], [-0.1, -0.2, -0.3])
    assert not wrong.passed and wrong.first_bad == 1 and "1 of 3" in wrong.reason


def test_sampled_answers_use_a_log_probability_floor():
    n = 40
    fine = _judge(False, list(range(n)), [0] * n, [-3.0] * n, [-0.1] * n)
    assert fine.passed
    one_rare = _judge(False, list(range(n)), [0] * n, [-3.0] * (n - 2) + [-20.0] * 2, [-0.1] * n)
    assert one_rare.passed  # 2 of 40 = 5%: tolerated
    implausible = _judge(False, list(range(n)), [0] * n, [-3.0] * (n - 5) + [-20.0] * 5, [-0.1] * n)
    assert not implausible.passed


def test_scores_that_do_not_cover_the_claim_fail():
    verdict = judge(
        VerifyPolicy(), greedy=True, claimed_token_ids=[1, 2], scored_token_ids=[1], logprobs=[0.0],
        argmax_token_ids=[1], argmax_logprobs=[0.0],
    )
    assert not verdict.passed
    assert not _judge(True, [], [], [], []).passed


def test_tally_and_retry_after_codec():
    tally = PeerTally()
    tally.add(True)
    tally.add(False)
    assert tally.score == 0.5
    assert retry_after_of(overloaded_message(1.25, "queue full")) == 1.25
    assert retry_after_of("nothing here") is None


def test_peer_replies_are_bounded():
    fields = dict(token_ids=[1], model="m", finish_reason="stop", queue_time_s=0.0, service_time_s=0.1)
    assert ProposeReply(text="ok", **fields).text == "ok"
    with pytest.raises(ValueError):
        ProposeReply(text="x" * (MAX_TEXT_CHARS + 1), **fields)
    with pytest.raises(ValueError):
        ProposeReply(text="ok", **{**fields, "token_ids": list(range(9000))})


def test_collaboration_settings_in_the_config(tmp_path):
    from knexa.node.config import ConfigError, load_config

    (tmp_path / "config.toml").write_text(
        'collab_bound = 0.7\ncollab_max_queue = 4\ncollab_admission = "off"\nverify_fraction = 1\n'
        'skills = "math=0.9, code=0.2"\n'
    )
    config = load_config(data_dir=tmp_path)
    assert (config.collab_bound, config.collab_max_queue, config.collab_admission) == (0.7, 4, "off")
    assert config.verify_fraction == 1.0 and config.skill_vector() == {"math": 0.9, "code": 0.2}
    for bad in ({"skills": "math=2"}, {"skills": "math"}, {"collab_bound": 1.5}, {"collab_admission": "maybe"},
                {"verify_fraction": -0.1}, {"collab_max_queue": 0}):
        with pytest.raises(ConfigError):
            load_config(data_dir=tmp_path, overrides=bad)
