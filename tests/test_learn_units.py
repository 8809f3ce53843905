"""The pure core of learning together: tasks, LinUCB pairing, rounds. No sockets, no model."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from knexa.node.learn import tasks
from knexa.node.learn.linucb import (
    Candidate,
    LinUCB,
    PairChoice,
    RewardScaler,
    choice_rejection,
    new_bandit,
    node_dim,
    oriented,
    pair_context,
    pair_dim,
    plan_pairs,
    profile_vector,
    random_pairs,
    round_relative,
)
from knexa.node.learn.rounds import (
    MatchmakerState,
    RewardReport,
    alpha_for,
    check_transfer,
    close_round,
    matchmaker_order,
    newest_state,
    next_plan,
    plan_rejection,
    quorum_round,
    reported,
    reward_signal,
    roster_rejection,
    round_finished,
    round_timing,
    state_rejection,
    succession_rejection,
    turn_rejection,
)

# -- tasks -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", tasks.FAMILIES)
def test_examples_are_deterministic_and_graded_by_their_own_answers(family: str) -> None:
    for category in tasks.CATEGORIES:
        examples = tasks.generate_examples(category, 20, seed=3, family=family)
        assert examples == tasks.generate_examples(category, 20, seed=3, family=family)
        assert all(e.category == category for e in examples)
        assert all(tasks.grade(e, e.answer) for e in examples)
        assert all(tasks.category_of(e.prompt) == category for e in examples)
        assert all(tasks.category_of(p) != tasks.GENERAL for p in tasks.transfer_set(8, seed=3, family=family))
    # Starting like a family prompt does not make one: its answer is not checkable, its skill not measured.
    for other in ("What is the capital of France?", "Convert this recipe to metric.", "Reverse the word 'cat', then"):
        assert tasks.category_of(other) == tasks.GENERAL


def test_the_families_share_categories_but_not_tasks() -> None:
    hard = {e.prompt for c in tasks.CATEGORIES for e in tasks.generate_examples(c, 30, seed=1, family="hard")}
    learnable = tasks.public_validation(30, seed=1, family="learnable")
    assert {e.category for e in learnable} == set(tasks.CATEGORIES)
    # Unit conversion and capital letters are learnt in both; sums and day offsets are not.
    assert not hard & {e.prompt for e in learnable if e.category in ("arithmetic", "dates")}
    assert tasks.generate_examples("units", 5, seed=1) == tasks.generate_examples("units", 5, 1, tasks.DEFAULT_FAMILY)
    first_letter = tasks.Example("What is the first letter of the word 'cat'?", "c", "strings")
    assert tasks.grade(first_letter, "The first letter is c.") and not tasks.grade(first_letter, "C")
    with pytest.raises(ValueError, match="unknown task family 'easy'"):
        tasks.transfer_set(4, seed=1, family="easy")


def test_grade_is_lenient_about_form_but_not_content() -> None:
    add = tasks.Example("What is 2 + 3?", "5", "arithmetic")
    assert tasks.grade(add, "5")
    assert tasks.grade(add, " The answer is 5.\nMore text 7")
    assert tasks.grade(add, "2 + 3 = 5")
    assert not tasks.grade(add, "2 + 3")
    assert not tasks.grade(add, "6")
    assert not tasks.grade(add, "")
    day = tasks.Example("What day...", "Wednesday", "dates")
    assert tasks.grade(day, "wednesday.")
    assert not tasks.grade(day, "Wednesday or Monday")
    assert not tasks.grade(day, "Thursday")
    upper = tasks.Example("capital letters", "CAT", "strings")
    assert tasks.grade(upper, "CAT")
    assert not tasks.grade(upper, "cat")


def test_teacher_votes_agree_on_what_grading_reads() -> None:
    assert tasks.answer_key("2 + 3 = 5") == tasks.answer_key("The answer is 5.\nor 7") == tasks.answer_key("5.0")
    assert tasks.answer_key("1,000 m") == tasks.answer_key("1000")
    assert tasks.answer_key("-0") == tasks.answer_key("0")
    assert tasks.answer_key("It is Wednesday.") == "Wednesday" and tasks.answer_key("...") is None
    assert tasks.majority(["It is 5", "5", "6"]) == "It is 5"  # the first sample that gives the agreed answer
    assert tasks.majority(["5", "6", "7"]) is None
    assert tasks.majority(["5", "6"]) is None  # a tie is no majority
    assert tasks.majority(["", "...", "5"]) is None  # samples with no answer count against agreement
    assert tasks.majority(["CAT", "cat", "CAT"]) == "CAT"
    assert tasks.majority([]) is None


@settings(max_examples=200, deadline=None)
@given(expected=st.integers(-99, 9999), output=st.text(alphabet="0123456789-., =abcXYZ\n", max_size=24))
def test_a_number_answer_key_is_right_exactly_when_grading_says_so(expected: int, output: str) -> None:
    """Votes are counted on the key, grading compares with the expected answer: the two must read an answer
    the same way, or an agreed answer could grade differently from the samples that agreed on it."""
    example = tasks.Example("What is ...?", str(expected), "arithmetic")
    assert tasks.grade(example, output) == (tasks.answer_key(output) == repr(float(expected)))


def test_dirichlet_split_deals_every_example_once_and_skews_skills() -> None:
    examples = [e for c in tasks.CATEGORIES for e in tasks.generate_examples(c, 50, seed=1)]
    shards = tasks.dirichlet_split(examples, 5, alpha=0.3, seed=2)
    assert sorted(e.prompt for s in shards for e in s) == sorted(e.prompt for e in examples)
    shares = [[sum(e.category == c for e in s) / 50 for c in tasks.CATEGORIES] for s in shards]
    assert max(max(row) for row in shares) > 0.5  # small alpha: some node holds most of some category


def test_split_train_val_keeps_each_category_in_validation() -> None:
    examples = [e for c in tasks.CATEGORIES for e in tasks.generate_examples(c, 10, seed=1)]
    train, val = tasks.split_train_val(examples, 0.2, seed=0)
    assert len(train) + len(val) == 40
    assert {e.category for e in val} == set(tasks.CATEGORIES)


def test_jsonl_loader_names_the_bad_line(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "p", "answer": "a"}\n\n{"prompt": "q", "answer": "b", "category": "math"}\n')
    assert tasks.load_jsonl(good) == [tasks.Example("p", "a", "general"), tasks.Example("q", "b", "math")]
    for text, fragment in [
        ('{"prompt": "p", "answer": "a"}\nnot json\n', ":2: not a JSON object"),
        ('[1, 2]\n', ":1: not a JSON object"),
        ('{"prompt": "", "answer": "a"}\n', "'prompt' must be a non-empty string"),
        ('{"prompt": "p", "answer": 3}\n', "'answer' must be a non-empty string"),
        ('{"prompt": "p", "answer": "a", "category": 7}\n', "'category'"),
        ("\n\n", "holds no examples"),
    ]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(text)
        with pytest.raises(tasks.DataError, match=fragment.replace("[", r"\[")):
            tasks.load_jsonl(bad)
    with pytest.raises(tasks.DataError, match="cannot read"):
        tasks.load_jsonl(tmp_path / "missing.jsonl")
    big = tmp_path / "big.jsonl"
    big.write_text(json.dumps({"prompt": "p", "answer": "a"}) + "\n")
    with pytest.raises(tasks.DataError, match="over the limit"):
        tasks.load_jsonl(big, max_bytes=10)
    # Not files: a directory, and a device that never ends (read line by line it would fill the memory).
    for not_a_file in (tmp_path, Path("/dev/zero")):
        with pytest.raises(tasks.DataError, match="not a regular file"):
            tasks.load_jsonl(not_a_file)
    not_utf8 = tmp_path / "latin1.jsonl"
    not_utf8.write_bytes(b'{"prompt": "caf\xe9", "answer": "a"}\n')
    with pytest.raises(tasks.DataError, match=":1: not a JSON object"):
        tasks.load_jsonl(not_utf8)


def test_a_given_transfer_set_gives_prompts_only_and_a_seeded_share_each_round(tmp_path: Path) -> None:
    given = tmp_path / "transfer.jsonl"
    rows = [{"prompt": f"Name colour {i}.", "answer": "a secret the teacher must not see"} for i in range(10)]
    given.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = tasks.load_prompts(given)
    assert prompts == [f"Name colour {i}." for i in range(10)]
    share = tasks.sample_prompts(prompts, 4, seed=3)
    assert share == tasks.sample_prompts(prompts, 4, seed=3) and len(set(share)) == 4 and set(share) <= set(prompts)
    assert share != tasks.sample_prompts(prompts, 4, seed=4)
    assert sorted(tasks.sample_prompts(prompts, 32, seed=3)) == sorted(prompts)  # fewer than asked: all of them
    for text, fragment in [('{"answer": "a"}\n', ":1: 'prompt' must be a non-empty string"),
                           ('{"prompt": "p"}\n"p"\n', ":2: not a JSON object"), ("\n", "holds no prompts")]:
        given.write_text(text)
        with pytest.raises(tasks.DataError, match=fragment):
            tasks.load_prompts(given)


def test_skill_scores_are_accuracy_per_category() -> None:
    a, b = tasks.Example("x", "1", "arithmetic"), tasks.Example("y", "CAT", "strings")
    assert tasks.skill_scores([(a, True), (a, False), (b, True)]) == {"arithmetic": 0.5, "strings": 1.0}


def test_a_student_learns_only_what_its_teacher_validated_better() -> None:
    units = tasks.generate_examples("units", 1, 0)[0].prompt
    dates = tasks.generate_examples("dates", 1, 0)[0].prompt
    strings = tasks.generate_examples("strings", 1, 0)[0].prompt
    answers = [(units, "3000"), (dates, "Friday"), (strings, "GRAPH"), ("Tell me a story.", "Once...")]
    teacher = {"units": 0.9, "dates": 0.2, tasks.GENERAL: 0.5}
    student = {"dates": 0.6, tasks.GENERAL: 0.5}
    # units: the student has no score (0); dates: the student is better; strings: the teacher never validated
    # any; general: a tie.
    assert tasks.answers_worth_learning(answers, teacher, student) == [(units, "3000")]
    # Unclassified prompts with no teacher score to judge them by are kept.
    assert tasks.answers_worth_learning(answers[3:], {}, student) == answers[3:]
    assert tasks.answers_worth_learning([(units, " "), (units, "")], teacher, student) == []  # left unanswered


def test_the_shared_validation_set_is_the_same_everywhere_and_covers_every_category() -> None:
    shared = tasks.public_validation(4)
    assert shared == tasks.public_validation(4) and len(shared) == 4 * len(tasks.CATEGORIES)
    assert {e.category for e in shared} == set(tasks.CATEGORIES)
    assert tasks.public_validation(0) == []
    # Only data of the task family gets it: a node with other data would be judged on unrelated skills.
    assert tasks.uses_task_family([tasks.Example("p", "a"), shared[0]])
    assert not tasks.uses_task_family([tasks.Example("p", "a", "poetry")])


# -- LinUCB ------------------------------------------------------------------------------------------


def test_linucb_learns_a_linear_reward_and_narrows_its_uncertainty() -> None:
    rng = np.random.default_rng(0)
    theta = rng.normal(size=6)
    bandit = LinUCB(6, lam=0.01, beta0=1.0)
    x = rng.normal(size=6)
    wide = bandit.score(x, 1).width
    for _ in range(200):
        z = rng.normal(size=6)
        bandit.update(z, float(theta @ z))
    assert bandit.score(x, 1).width < wide / 10
    assert np.allclose(bandit.theta(), theta, atol=1e-2)
    assert bandit.beta(4) == pytest.approx(0.5)


def test_bandit_state_round_trips_and_refuses_junk() -> None:
    bandit = LinUCB(4)
    bandit.update([1, 0, 2, 0], 0.5)
    again = LinUCB.from_dict(bandit.to_dict())
    assert np.array_equal(again.A, bandit.A) and np.array_equal(again.b, bandit.b) and again.updates == 1
    for junk in [None, {}, {**bandit.to_dict(), "A": [0.0] * 16}, {**bandit.to_dict(), "b": [1.0]},
                 {**bandit.to_dict(), "dim": 999}, {**bandit.to_dict(), "A": [float("nan")] * 16}]:
        with pytest.raises(ValueError):
            LinUCB.from_dict(junk)


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                               max_size=4), max_leaves=20))
def test_state_parsers_raise_only_value_error_on_anything(raw: object) -> None:
    for parser in (MatchmakerState.from_dict, RewardReport.from_dict, PairChoice.from_dict, LinUCB.from_dict):
        try:
            parser(raw)
        except ValueError:
            pass


def _candidates(n: int, seed: int = 0) -> list[Candidate]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        skills = {c: rng.random() for c in tasks.CATEGORIES}
        accuracy = sum(skills.values()) / len(skills)
        out.append(Candidate(f"peer{i:02d}", profile_vector(skills, accuracy), accuracy))
    return out


def test_plan_pairs_is_disjoint_oriented_and_floor_half() -> None:
    for n in (2, 3, 5, 8):
        candidates = _candidates(n)
        perf = {c.peer_id: c.performance for c in candidates}
        pairs = plan_pairs(candidates, new_bandit(), 1)
        assert len(pairs) == n // 2
        members = [m for p in pairs for m in (p.teacher, p.student)]
        assert len(members) == len(set(members))
        assert all(perf[p.teacher] >= perf[p.student] for p in pairs)
        assert plan_pairs(candidates, new_bandit(), 1) == pairs  # deterministic
        randomly = random_pairs(candidates, random.Random(1))
        assert len(randomly) == n // 2 and all(perf[p.teacher] >= perf[p.student] for p in randomly)


def _optimal_value(candidates: list[Candidate], value) -> float:
    """Best total of any set of floor(N/2) disjoint pairs (exhaustive: N is small)."""
    def best(pool: tuple[Candidate, ...]) -> float:
        if len(pool) < 2:
            return 0.0
        first, rest = pool[0], pool[1:]
        options = [value(first, other) + best(tuple(c for c in rest if c is not other)) for other in rest]
        if len(pool) % 2:
            options.append(best(rest))
        return max(options)
    return best(tuple(candidates))


def test_linucb_pairing_has_lower_regret_than_random_on_a_hidden_synergy() -> None:
    """A population whose pair reward is a hidden function of the two profiles plus noise: the learned
    matchmaker's cumulative regret is well below random pairing's, over several seeds."""
    totals = {"linucb": 0.0, "random": 0.0}
    for seed in range(3):
        candidates = _candidates(8, seed=100 + seed)
        by_id = {c.peer_id: c for c in candidates}
        hidden = np.random.default_rng(seed).normal(size=pair_dim())

        def expected(teacher: Candidate, student: Candidate, hidden=hidden) -> float:
            return float(hidden @ pair_context(teacher.vector, student.vector))

        def pair_value(a: Candidate, b: Candidate, expected=expected) -> float:
            teacher, student = (a, b) if (a.performance, b.peer_id) >= (b.performance, a.peer_id) else (b, a)
            return expected(teacher, student)

        best = _optimal_value(candidates, pair_value)
        noise = np.random.default_rng(1000 + seed)
        bandit, rng = new_bandit(), random.Random(seed)
        for round_no in range(1, 61):
            for name, pairs in (("linucb", plan_pairs(candidates, bandit, round_no)),
                                ("random", random_pairs(candidates, rng))):
                got = sum(expected(by_id[p.teacher], by_id[p.student]) for p in pairs)
                totals[name] += best - got
                if name == "linucb":
                    for p in pairs:
                        bandit.update(p.context, expected(by_id[p.teacher], by_id[p.student]) + noise.normal(0, 0.3))
    assert totals["linucb"] < 0.5 * totals["random"], totals


def test_pair_context_holds_both_profiles_and_the_teachers_lead() -> None:
    teacher = profile_vector({"arithmetic": 0.9, "units": 0.2}, 0.5)
    student = profile_vector({"arithmetic": 0.1, "units": 0.6}, 0.3)
    x = pair_context(teacher, student)
    assert len(x) == pair_dim() == 2 * node_dim() + len(tasks.CATEGORIES)
    assert np.array_equal(x[: node_dim()], teacher) and np.array_equal(x[node_dim() : 2 * node_dim()], student)
    lead = dict(zip(tasks.CATEGORIES, x[2 * node_dim() :], strict=True))
    assert lead["arithmetic"] == pytest.approx(0.8) and lead["units"] == 0.0  # the student is ahead in units


def test_the_prior_prefers_a_teacher_strong_where_the_student_is_weak() -> None:
    """Before any reward, the pair whose teacher leads where the student is weak scores first."""
    fresh = new_bandit()
    strong = profile_vector({"arithmetic": 0.9, "units": 0.9, "strings": 0.1, "dates": 0.1}, 0.5)
    weak_same = profile_vector({"arithmetic": 0.8, "units": 0.8, "strings": 0.0, "dates": 0.0}, 0.4)
    weak_other = profile_vector({"arithmetic": 0.0, "units": 0.0, "strings": 0.3, "dates": 0.3}, 0.15)
    assert fresh.score(pair_context(strong, weak_other), 1).mean > fresh.score(pair_context(strong, weak_same), 1).mean
    assert np.allclose(fresh.theta()[2 * node_dim() :], 1.0) and np.allclose(fresh.theta()[: 2 * node_dim()], 0.0)
    assert np.allclose(LinUCB.from_dict(fresh.to_dict()).theta(), fresh.theta())  # the prior lives in b


def test_round_relative_contexts_carry_no_level_but_keep_their_bias_terms() -> None:
    contexts = [pair_context(t.vector, s.vector) for t, s in zip(_candidates(6)[:3], _candidates(6)[3:], strict=True)]
    relative = np.array(round_relative(contexts))
    bias = [node_dim() - 1, 2 * node_dim() - 1]
    assert np.allclose(relative[:, bias], 1.0)
    others = [i for i in range(pair_dim()) if i not in bias]
    assert np.allclose(relative[:, others].mean(axis=0), 0.0)
    assert np.allclose(relative[0] - relative[1], np.array(contexts[0]) - np.array(contexts[1]))
    with pytest.raises(ValueError):
        round_relative([[0.0] * (pair_dim() - 1)])


def test_rewards_that_rank_a_round_as_the_prior_did_leave_the_prior_as_it_was() -> None:
    """Rewards count against their round's mean, so they sum to zero, while the prior predicts a large reward
    for every pair it picks. Were that gap taken as news, every round would pull the bandit off the teacher's
    lead whatever order the rewards put the pairs in."""
    for seed in range(3):
        state = next_plan(MatchmakerState.initial(), _candidates(6, seed), "peer00", now_ms=1_000,
                          round_deadline_s=60)
        lead = {p.student: sum(p.context[2 * node_dim() :]) for p in state.plan.pairs}
        assert len(set(lead.values())) == 3
        closed, _ = close_round(state, {p.student: RewardReport(1, p.student, p.teacher, 0.0, 0.5, True,
                                                                lead[p.student]) for p in state.plan.pairs})
        assert closed.bandit.updates == 3
        assert np.allclose(closed.bandit.theta(), new_bandit().theta(), atol=1e-9)


def _complementary_population(n: int, seed: int) -> list[Candidate]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        skills = np.clip(rng.dirichlet([0.5] * len(tasks.CATEGORIES)) * rng.uniform(0.5, 1.5), 0, 1)
        out.append(Candidate(f"peer{i:02d}", profile_vector(dict(zip(tasks.CATEGORIES, skills, strict=True)),
                                                            float(skills.mean())), float(skills.mean())))
    return out


def test_linucb_finds_complementary_pairs_in_few_rounds() -> None:
    """A student gains where its teacher leads it, the weight of each category hidden, the reward noisy: over
    few rounds, as a mesh runs them, the matchmaker's pairs gain clearly more than random pairs."""
    totals = {"linucb": 0.0, "random": 0.0}
    for seed in range(40):
        candidates = _complementary_population(6, seed)
        by_id = {c.peer_id: c for c in candidates}
        weights = np.random.default_rng(500 + seed).uniform(0.2, 2.0, size=len(tasks.CATEGORIES))

        def gain(p: PairChoice, by_id=by_id, weights=weights) -> float:
            lead = np.maximum(0.0, by_id[p.teacher].vector[:-2] - by_id[p.student].vector[:-2])
            return float(weights @ lead)

        bandit, rng, noise = new_bandit(), random.Random(seed), np.random.default_rng(seed)
        for round_no in range(1, 6):
            totals["random"] += sum(gain(p) for p in random_pairs(candidates, rng))
            pairs = plan_pairs(candidates, bandit, round_no)
            totals["linucb"] += sum(gain(p) for p in pairs)
            for p in pairs:
                bandit.update(p.context, gain(p) + noise.normal(0, 0.5))
    assert totals["linucb"] > 1.08 * totals["random"], totals


def _trained_bandit(candidates: list[Candidate], seed: int) -> LinUCB:
    bandit, rng = new_bandit(), random.Random(seed)
    for round_no in range(1, 4):
        for p in plan_pairs(candidates, bandit, round_no):
            bandit.update(p.context, rng.gauss(0, 1))
    return bandit


def _paired(teacher: Candidate, student: Candidate, bandit: LinUCB, round_no: int) -> PairChoice:
    x = pair_context(teacher.vector, student.vector)
    score = bandit.score(x, round_no)
    return PairChoice(teacher.peer_id, student.peer_id, tuple(float(v) for v in x), score.mean, score.width)


@settings(max_examples=300, deadline=None)
@given(st.integers(2, 9), st.integers(0, 2**31), st.integers(1, 40), st.integers(0, 6), st.booleans())
def test_an_honest_plan_always_passes_the_checks_every_node_makes(n: int, seed: int, round_no: int, trained: int,
                                                                 alike: bool) -> None:
    """A refused honest plan would split the mesh: whatever the members (alike ones tie on every score), the
    bandit and the round, the plan `next_plan` makes passes, as the ledger carries it."""
    rng = random.Random(seed)
    candidates = _candidates(n, seed)
    if alike:  # a new mesh: every member validated the same
        candidates = [Candidate(c.peer_id, profile_vector({}, 0.5), 0.5) for c in candidates]
    bandit = new_bandit()
    for _ in range(trained):
        for p in plan_pairs(candidates, bandit, rng.randint(1, 40)):
            bandit.update(p.context, rng.gauss(0, 2))
    state = dataclasses.replace(MatchmakerState.initial(), round_no=round_no - 1, bandit=bandit)
    planned = next_plan(state, candidates, "peer00", now_ms=1_000, round_deadline_s=60)
    carried = MatchmakerState.from_dict(msgpack.unpackb(msgpack.packb(planned.to_dict())))
    assert plan_rejection(carried.plan, carried.bandit) is None
    assert roster_rejection(carried.plan, {c.peer_id: tuple(c.vector) for c in candidates}) is None


def test_a_plan_must_pair_the_members_it_names_as_the_bandit_chooses() -> None:
    """Honest plans pass for any number of members (odd: the one left out changes nothing); a matching of the
    matchmaker's own choosing, a student teaching, a score or a lead that the bandit did not give are refused."""
    for n, seed in ((2, 0), (5, 1), (6, 2), (9, 3)):
        candidates = _candidates(n, seed)
        bandit = _trained_bandit(candidates, seed)
        assert choice_rejection(plan_pairs(candidates, bandit, 4), bandit, 4) is None
    candidates = _candidates(6, 7)
    bandit = _trained_bandit(candidates, 7)
    chosen = plan_pairs(candidates, bandit, 4)
    by_id = {c.peer_id: c for c in candidates}
    # The same members, paired otherwise: each pair scored and oriented honestly, the matching not greedy.
    (a, b), (c, d) = ((p.teacher, p.student) for p in chosen[:2])
    rematched = [_paired(*oriented(by_id[a], by_id[c]), bandit, 4), _paired(*oriented(by_id[b], by_id[d]), bandit, 4),
                 *chosen[2:]]
    assert "greedy choice" in choice_rejection(rematched, bandit, 4)
    flipped = [_paired(by_id[chosen[0].student], by_id[chosen[0].teacher], bandit, 4), *chosen[1:]]
    assert "better performer" in choice_rejection(flipped, bandit, 4)
    puffed = [dataclasses.replace(chosen[0], mean=chosen[0].mean + 1.0), *chosen[1:]]
    assert "scored otherwise" in choice_rejection(puffed, bandit, 4)
    assert "scored otherwise" in choice_rejection(chosen, bandit, 1)  # another round's width
    context = list(chosen[0].context)
    context[-1] += 0.5  # a lead the two profiles do not give
    assert "lead" in choice_rejection([dataclasses.replace(chosen[0], context=tuple(context)), *chosen[1:]], bandit, 4)
    assert "no pairs" in choice_rejection([], bandit, 4)
    short = [dataclasses.replace(chosen[0], context=chosen[0].context[:-1]), *chosen[1:]]
    assert "layout" in choice_rejection(short, bandit, 4)


def test_a_state_of_another_context_layout_is_refused() -> None:
    raw = MatchmakerState.initial().to_dict()
    raw["bandit"] = LinUCB(2 * node_dim()).to_dict()  # concatenated profiles only, as before the lead was added
    with pytest.raises(ValueError, match="dimension"):
        MatchmakerState.from_dict(raw)


def test_reward_scaler_z_scores_against_past_gains() -> None:
    scaler = RewardScaler()
    assert scaler.z(0.2) is None  # nothing seen yet to compare with
    assert scaler.z(0.2, baseline=0.5) == pytest.approx(-0.3)  # the round's other pairs: the difference, unscaled
    for gain in (0.0, 0.1, 0.2, 0.1):
        scaler.observe(gain)
    assert scaler.z(0.1) == pytest.approx(0.0)
    assert scaler.z(0.3) > 0 > scaler.z(-0.1)
    assert RewardScaler.from_dict(scaler.to_dict()).z(0.3) == scaler.z(0.3)
    # Drops a few hundredths apart (students training again from one live adapter): no reward of +-3 for that.
    close = RewardScaler()
    for drop in (2.89, 2.92, 2.87):
        close.observe(drop)
    assert close.z(2.98) == pytest.approx((2.98 - (2.89 + 2.92 + 2.87) / 3) / 0.05)


# -- rounds ------------------------------------------------------------------------------------------


def test_matchmaker_order_is_deterministic_and_agrees_across_views_of_the_members() -> None:
    members = ["c", "a", "d", "b", "e"]
    for round_no in range(1, 30):
        order = matchmaker_order(round_no, members)
        assert sorted(order) == sorted(members)
        assert matchmaker_order(round_no, list(reversed(members)) + ["a"]) == order
        # A node that does not know of a member ranks the others as every node does.
        for missing in members:
            assert matchmaker_order(round_no, [m for m in members if m != missing]) == [
                m for m in order if m != missing]
    assert len({matchmaker_order(r, members)[0] for r in range(1, 60)}) == 5  # the duty moves around
    assert matchmaker_order(1, []) == []


def test_alpha_schedule_rises_from_point_two_to_point_five() -> None:
    assert alpha_for(1) == 0.2
    assert 0.2 < alpha_for(5) < 0.5
    assert alpha_for(10) == 0.5 and alpha_for(50) == 0.5


def _planned() -> MatchmakerState:
    candidates = _candidates(4)
    return next_plan(MatchmakerState.initial(), candidates, "peer00", now_ms=1_000, round_deadline_s=60)


def test_a_round_closes_on_the_assigned_students_rewards_only() -> None:
    state = _planned()
    plan = state.plan
    assert plan is not None and plan.round_no == 1 and len(plan.pairs) == 2
    first, second = plan.pairs
    good = RewardReport(1, first.student, first.teacher, 0.1, 0.6, True, 0.25)
    rewards = {
        first.student: good,
        second.student: RewardReport(1, second.student, first.teacher, 0.9, 0.9, True, 0.2),  # wrong teacher
        second.teacher: RewardReport(1, second.teacher, second.student, 0.9, 0.9, True, 0.2),  # not a student
        "outsider": RewardReport(1, "outsider", first.teacher, 0.9, 0.9, True, 0.2),
    }
    assert not round_finished(plan, rewards, now_ms=2_000)
    closed, rejected = close_round(state, rewards)
    assert len(rejected) == 3
    # The one valid reward is recorded and measured; alone, with nothing yet to compare it with, it moves no
    # estimate (see the loss-drop test).
    assert closed.plan is None and closed.scaler.count == 1 and closed.bandit.updates == 0
    assert closed.history[-1].rewards == ((first.student, 0.1, 0.25, 0.0),)
    assert round_finished(plan, rewards, now_ms=plan.deadline_ms)
    assert round_finished(plan, {p.student: RewardReport(1, p.student, p.teacher, 0.0, 0.5, False, 0.2)
                                 for p in plan.pairs}, now_ms=2_000)
    # A member that died or left: its pair is done (the service names it gone once its membership has been
    # missing for a membership's lifetime); the other pairs' rewards are what the round waits for.
    assert round_finished(plan, {first.student: good}, 2_000, gone={second.teacher})
    assert round_finished(plan, {first.student: good}, 2_000, gone={second.student})
    assert not round_finished(plan, {}, 2_000, gone={second.teacher})  # the first pair is still due
    again = next_plan(closed, _candidates(4), "peer01", now_ms=5_000, round_deadline_s=60)
    assert again.round_no == 2 and again.plan.alpha == alpha_for(2)
    assert newest_state([state, again, closed]) is again


def test_the_kept_loss_drop_signal_credits_only_a_kept_shadow() -> None:
    state = _planned()
    first, second = state.plan.pairs
    reports = {  # the same drops; only the first student kept its shadow
        first.student: RewardReport(1, first.student, first.teacher, 0.1, 0.5, True, 0.3),
        second.student: RewardReport(1, second.student, second.teacher, 0.0, 0.4, False, 0.5),
    }
    by_default = {r[0]: r[3] for r in close_round(state, reports)[0].history[-1].rewards}
    assert by_default[second.student] > 0 > by_default[first.student]  # the larger drop wins, kept or not
    kept_only, _ = close_round(state, reports, signal="kept_loss_drop")
    assert {r[0]: r[3] for r in kept_only.history[-1].rewards}[first.student] > 0
    assert {r[0]: r[2] for r in kept_only.history[-1].rewards}[second.student] == 0.5  # the drop, as measured
    assert reward_signal(reports[second.student], "kept_loss_drop") == 0.0
    with pytest.raises(ValueError):
        reward_signal(reports[first.student], "accuracy")


def test_state_round_trips_through_its_ledger_form() -> None:
    state = _planned()
    closed, _ = close_round(state, {p.student: RewardReport(1, p.student, p.teacher, 0.05, 0.5, True, 0.2)
                                    for p in state.plan.pairs})
    for value in (state, closed):
        again = MatchmakerState.from_dict(json.loads(json.dumps(value.to_dict())))
        assert again.to_dict() == value.to_dict()
    forged = state.to_dict()
    forged["plan"]["round"] = 7
    with pytest.raises(ValueError):
        MatchmakerState.from_dict(forged)


def _state_at(round_no: int, matchmaker: str, now_ms: int = 1_000, deadline_s: float = 60) -> MatchmakerState:
    before = dataclasses.replace(MatchmakerState.initial(), round_no=round_no - 1)
    return next_plan(before, _candidates(4), matchmaker, now_ms=now_ms, round_deadline_s=deadline_s)


def test_no_single_member_moves_the_rounds_more_than_one_ahead() -> None:
    followed = {"a": 5, "b": 5, "c": 4, "liar": 10**9, "joining": 0}
    assert quorum_round(followed, author="liar", me="b") == 4  # both of a and c follow 4 or more
    assert quorum_round(followed, author="a", me="b") == 4  # the liar's word counts, but is outvoted by c
    assert quorum_round({**followed, "d": 5}, author="a", me="b") == 5
    assert quorum_round({"a": 5, "me": 3}, author="a", me="me") is None  # nobody else: no quorum
    now = 1_000_000
    assert state_rejection(_state_at(6, "a", now), "a", followed, "b", now) is None  # the next round
    assert state_rejection(_state_at(5, "a", now), "a", followed, "b", now) is None
    assert "ahead" in state_rejection(_state_at(7, "liar", now), "liar", followed, "b", now)
    assert "ahead" in state_rejection(_state_at(2**62, "liar", now), "liar", followed, "b", now)
    assert state_rejection(_state_at(2**62, "liar", now), "liar", {"b": 0}, "b", now) is None  # a new mesh
    # Members that lag (or lie low) hold no node back: one round ahead of its own is always allowed.
    low = {"a": 9, "b": 9, "stale": 1, "liar": 1}
    assert state_rejection(_state_at(10, "a", now), "a", low, "b", now) is None
    # A node that joined, or fell behind, catches up with what most others follow.
    assert state_rejection(_state_at(9, "a", now), "a", {"a": 8, "b": 0, "c": 8, "d": 8}, "b", now) is None
    assert "ahead" in state_rejection(_state_at(9, "a", now), "a", {"a": 8, "b": 3, "c": 3, "d": 8}, "b", now)
    future = _state_at(6, "a", now + 3_600_000)
    assert "future" in state_rejection(future, "a", followed, "b", now)
    assert state_rejection(future, "a", followed, "b", now + 3_600_000) is None


def test_a_state_must_be_its_parent_closed_with_the_rewards_the_students_signed() -> None:
    parent = _planned()
    first, second = parent.plan.pairs
    signed = {first.student: RewardReport(1, first.student, first.teacher, 0.1, 0.6, True, 0.3),
              second.student: RewardReport(1, second.student, second.teacher, 0.0, 0.5, False, 0.1)}

    def successor(rewards: dict, matchmaker: str = "peer02") -> MatchmakerState:
        return next_plan(close_round(parent, rewards)[0], _candidates(4), matchmaker, now_ms=9_000,
                         round_deadline_s=60)

    honest = successor(signed)
    assert succession_rejection(parent, honest, signed) is None
    assert succession_rejection(parent, successor({first.student: signed[first.student]}), signed) is None  # late
    inflated = {**signed, first.student: dataclasses.replace(signed[first.student], loss_drop=5.0)}
    assert "another reward than the student signed" in succession_rejection(parent, successor(inflated), signed)
    assert succession_rejection(parent, successor(inflated), {}) is None  # nothing held to tell
    tampered = LinUCB.from_dict(honest.bandit.to_dict())
    tampered.b[0] += 0.5
    assert "bandit" in succession_rejection(parent, dataclasses.replace(honest, bandit=tampered), signed)
    unrecorded = dataclasses.replace(honest, history=())
    assert "does not record" in succession_rejection(parent, unrecorded, signed)
    record = honest.history[-1]
    swapped_pairs = tuple(dataclasses.replace(p, teacher=p.student, student=p.teacher) for p in record.pairs)
    other_plan = dataclasses.replace(honest, history=(dataclasses.replace(record, pairs=swapped_pairs),))
    assert "another plan" in succession_rejection(parent, other_plan, signed)
    # Round 1 follows the initial state: a fresh bandit, no history.
    assert succession_rejection(MatchmakerState.initial(), parent, {}) is None
    primed = dataclasses.replace(parent, bandit=tampered)
    assert "bandit" in succession_rejection(MatchmakerState.initial(), primed, {})
    # Old history may give way to fit the ledger entry; the last round's record stays.
    third = next_plan(close_round(honest, {})[0], _candidates(4), "peer03", now_ms=20_000, round_deadline_s=60)
    assert len(third.history) == 2
    assert succession_rejection(honest, dataclasses.replace(third, history=third.history[-1:]), {}) is None


def test_a_plan_cannot_choose_its_alpha_or_transfer_seed_or_end_before_it_begins() -> None:
    state = _state_at(3, "a")
    plan, bandit = state.plan, state.bandit
    assert plan_rejection(plan, bandit) is None
    assert "alpha" in plan_rejection(dataclasses.replace(plan, alpha=1.0), bandit)
    assert "transfer seed" in plan_rejection(dataclasses.replace(plan, transfer_seed=99), bandit)
    assert "deadline" in plan_rejection(dataclasses.replace(plan, deadline_ms=plan.created_ms - 1), bandit)
    taught = LinUCB.from_dict(bandit.to_dict())
    taught.update(plan.pairs[0].context, 2.0)
    assert "scored otherwise" in plan_rejection(plan, taught)  # the pairs are the choice of the state's bandit


def test_a_lying_member_state_is_refused_and_the_honest_one_followed(tmp_path: Path) -> None:
    """The service's choice of the state to follow, on real ledgers (no engine or network: the RPC registry
    is a stand-in, as in the test below). Members follow round 3; a liar publishes states around it."""
    from types import SimpleNamespace

    from knexa.crdt.ledger import Ledger
    from knexa.node.learn.service import LearnService
    from tests.crdt_helpers import KEY_PAIRS

    me, honest, other, liar = (Ledger(KEY_PAIRS[i]) for i in range(4))
    now = int(time.time() * 1000)
    member = {"accuracy": 0.5, "skills": {}, "round": 3}
    me.merge([honest.put_learn("state", _state_at(3, honest.peer_id, now).to_dict(), None),
              *(ledger.put_learn("member", member, None) for ledger in (me, honest, other)),
              liar.put_learn("member", {**member, "round": 10**6}, None)])
    service = LearnService(SimpleNamespace(register=lambda *a: None), None, me.peer_id, lambda: None,
                           lambda: me, lambda entries: None, tmp_path)

    def follows_after(lie: MatchmakerState) -> MatchmakerState | None:
        me.merge([liar.put_learn("state", lie.to_dict(), None)])
        return service.current_state()

    for _ in range(3):
        assert follows_after(_state_at(10**6 + 1, liar.peer_id, now)).plan.matchmaker == honest.peer_id
    assert service.rejected == {"matchmaker state ahead of the round the members follow": 1}
    assert follows_after(_state_at(3, liar.peer_id, now + 3_600_000)).plan.matchmaker == honest.peer_id
    assert service.rejected["matchmaker state dated in the future"] == 1
    greedy = _state_at(4, liar.peer_id, now)
    greedy = dataclasses.replace(greedy, plan=dataclasses.replace(greedy.plan, alpha=1.0))
    assert follows_after(greedy).plan.matchmaker == honest.peer_id
    assert service.rejected["plan with another alpha than its round's"] == 1
    # The next round, planned by the liar out of turn: its state must be what closing round 3 gives.
    closed, _ = close_round(service.current_state(), {})
    learned = LinUCB.from_dict(closed.bandit.to_dict())
    learned.update(closed.bandit.b * 0 + 1, 3.0)  # what no reward taught it
    rewritten = next_plan(dataclasses.replace(closed, bandit=learned), _candidates(4), liar.peer_id, now, 60)
    assert follows_after(rewritten).plan.matchmaker == honest.peer_id
    assert service.rejected["matchmaker state whose bandit is not its rewards' result"] == 1
    # Closed honestly, but paired as the liar likes: each pair scored by the bandit, the matching not its choice.
    honest_plan = next_plan(closed, _candidates(4), liar.peer_id, now, 60).plan
    by_id = {c.peer_id: c for c in _candidates(4)}
    (a, b), (c, d) = ((p.teacher, p.student) for p in honest_plan.pairs)
    own_pairs = (_paired(*oriented(by_id[a], by_id[c]), closed.bandit, 4),
                 _paired(*oriented(by_id[b], by_id[d]), closed.bandit, 4))
    hand_picked = dataclasses.replace(closed, round_no=4, plan=dataclasses.replace(honest_plan, pairs=own_pairs))
    assert follows_after(hand_picked).plan.matchmaker == honest.peer_id
    assert service.rejected["plan whose pairs are not the bandit's greedy choice"] == 1
    endless = follows_after(next_plan(closed, _candidates(4), liar.peer_id, now, 10**7))  # one ahead: allowed
    assert endless.plan.matchmaker == liar.peer_id and endless.round_no == 4
    assert endless.plan.deadline_ms == now + int(service.settings.round_deadline_s * 1000)  # held no longer


def test_a_plan_made_out_of_turn_waits_for_its_authors_turn_and_ranks_after_earlier_ones() -> None:
    members = [f"peer{i}" for i in range(5)]
    order = matchmaker_order(4, members)
    plans = {peer: _state_at(4, peer) for peer in members}
    period = 30.0
    assert turn_rejection(plans[order[0]], members, None, period) is None  # the first plans at once
    assert "turn" in turn_rejection(plans[order[2]], members, None, period)  # the round is not over here yet
    assert "turn" in turn_rejection(plans[order[2]], members, 40.0, period)  # the third acts after two periods
    assert turn_rejection(plans[order[2]], members, 45.0, period) is None  # (less half a period of slack)
    # A member this node does not know of stands where every node ranks it.
    assert turn_rejection(plans[order[0]], order[1:], None, period) is None
    assert "turn" in turn_rejection(plans[order[1]], [order[0], order[2]], 0.0, period)
    assert turn_rejection(plans[order[1]], [order[2], order[3]], None, period) is None
    # Of two plans for a round, the one whose author comes first is followed, whatever their dates.
    late_first = _state_at(4, order[0], now_ms=1_000)
    early_second = _state_at(4, order[1], now_ms=50_000)
    assert newest_state([early_second, late_first]) is late_first
    assert newest_state([late_first, early_second]) is late_first
    assert newest_state([late_first, _state_at(5, order[4])]).round_no == 5


def test_a_member_is_gone_once_its_membership_has_been_missing_for_a_lifetime(tmp_path: Path) -> None:
    """What `round_finished` is given as gone (real ledgers; the RPC registry is a stand-in, as above): a
    member whose record went, for `learn_member_ttl_s` more; one whose record comes back is not."""
    from types import SimpleNamespace

    from knexa.crdt.ledger import Ledger
    from knexa.node.learn.service import LearnService
    from tests.crdt_helpers import KEY_PAIRS

    me, dying, lagging = (Ledger(KEY_PAIRS[i]) for i in range(3))
    member = {"accuracy": 0.5, "skills": {}, "round": 0}
    records = {ledger.peer_id: ledger.put_learn("member", member, None) for ledger in (me, dying, lagging)}
    me.merge(list(records.values()))
    service = LearnService(SimpleNamespace(register=lambda *a: None), None, me.peer_id, lambda: None,
                           lambda: me, lambda entries: None, tmp_path)
    service.current_state()
    assert service._gone() == set()
    me.merge([dying.retract_learn("member", 60.0), lagging.retract_learn("member", 60.0)])
    service.current_state()
    assert service._gone() == set()  # missing, not yet for a lifetime
    service._missing_since = {peer: since - service.settings.member_ttl_s for peer, since in
                              service._missing_since.items()}
    me.merge([lagging.put_learn("member", member, None)])  # its next refresh arrives
    service.current_state()
    assert service._gone() == {dying.peer_id}


def test_an_out_of_turn_plan_is_held_and_the_first_members_plan_followed(tmp_path: Path) -> None:
    """A member in the rounds, on real ledgers (the RPC registry is a stand-in, as above): round 3 is over,
    the last member in round 4's order plans at once, dated later; this node waits for the first's plan."""
    from types import SimpleNamespace

    from knexa.crdt.ledger import Ledger
    from knexa.node.learn.service import LearnService
    from tests.crdt_helpers import KEY_PAIRS

    ledgers = {ledger.peer_id: ledger for ledger in (Ledger(KEY_PAIRS[i]) for i in range(4))}
    order = matchmaker_order(4, list(ledgers))
    first, me, last = ledgers[order[0]], ledgers[order[1]], ledgers[order[-1]]
    now = int(time.time() * 1000)
    round3 = _state_at(3, me.peer_id, now - 120_000, deadline_s=60)  # its deadline has passed
    me.merge([me.put_learn("state", round3.to_dict(), None),
              *(ledger.put_learn("member", {"accuracy": 0.5, "skills": {}, "round": 3}, None)
                for ledger in ledgers.values())])
    service = LearnService(SimpleNamespace(register=lambda *a: None), None, me.peer_id, lambda: None,
                           lambda: me, lambda entries: None, tmp_path)
    service.phase = "enrolled"  # as after `learn` (no engine here)
    assert service.current_state() is not None
    service._followed = 3
    closed, _ = close_round(round3, {})
    me.merge([last.put_learn("state", next_plan(closed, _candidates(4), last.peer_id, now + 30_000, 60).to_dict(),
                             None)])
    assert service.current_state().round_no == 3  # held: not refused, not followed
    assert not service.rejected
    service._finished_seen[4] = time.monotonic() - 10 * service.settings.takeover_s  # its turn has come
    assert service.current_state().plan.matchmaker == last.peer_id
    me.merge([first.put_learn("state", next_plan(closed, _candidates(4), first.peer_id, now, 60).to_dict(), None)])
    assert service.current_state().plan.matchmaker == first.peer_id
    assert not service.rejected


def test_a_plan_must_name_the_members_every_node_knew_of_with_the_profiles_they_published() -> None:
    def plan_of(candidates: list[Candidate]):
        return next_plan(MatchmakerState.initial(), candidates, "peer00", 1_000, 60).plan

    five = _candidates(5, 3)
    published = {c.peer_id: tuple(c.vector) for c in five}
    assert roster_rejection(plan_of(five), published) is None  # four named, one left over
    assert roster_rejection(plan_of(five[:4]), published) is None
    assert "leaving out" in roster_rejection(plan_of(five[:3]), published)
    assert roster_rejection(plan_of(five[:3]), {c: published[c] for c in ("peer00", "peer01", "peer02")}) is None
    assert "leaving out" in roster_rejection(plan_of(five[:3]), {}, known=published)  # profiles unsettled
    skills = dict(zip(tasks.CATEGORIES, [1.0] * len(tasks.CATEGORIES), strict=True))
    puffed = [Candidate("peer00", profile_vector(skills, 1.0), 1.0), *five[1:4]]  # a member made a star
    assert "another profile" in roster_rejection(plan_of(puffed), published)
    assert roster_rejection(plan_of(puffed), {c: v for c, v in published.items() if c != "peer00"},
                            known=["peer00"]) is None  # its skills changed lately here: not checked


def test_a_plan_leaving_out_or_misstating_members_is_refused_by_a_node_in_the_rounds(tmp_path: Path) -> None:
    """A member in the rounds, on real ledgers (the RPC registry is a stand-in, as above): round 3 is over and
    the first in round 4's order plans it, leaving members out, then making one a star, then honestly."""
    from types import SimpleNamespace

    from knexa.crdt.ledger import Ledger
    from knexa.node.learn.service import LearnService
    from tests.crdt_helpers import KEY_PAIRS

    ledgers = {ledger.peer_id: ledger for ledger in (Ledger(KEY_PAIRS[i]) for i in range(4))}
    order = matchmaker_order(4, list(ledgers))
    first, me = ledgers[order[0]], ledgers[order[1]]
    now = int(time.time() * 1000)
    round3 = _state_at(3, me.peer_id, now - 120_000, deadline_s=60)  # its deadline has passed
    me.merge([me.put_learn("state", round3.to_dict(), None),
              *(ledger.put_learn("member", {"accuracy": 0.1 * i, "skills": {"units": 0.2 * i}, "round": 3}, None)
                for i, ledger in enumerate(ledgers.values()))])
    service = LearnService(SimpleNamespace(register=lambda *a: None), None, me.peer_id, lambda: None,
                           lambda: me, lambda entries: None, tmp_path)
    service.phase = "enrolled"  # as after `learn` (no engine here)
    service.settings.takeover_s = 0.0  # profiles seen now count as settled once it follows round 3
    assert service.current_state().round_no == 3
    service._followed = 3
    closed, _ = close_round(round3, {})
    members = sorted(service.members().values(), key=lambda c: c.peer_id)

    def follows_after(candidates: list[Candidate]) -> MatchmakerState:
        plan = next_plan(closed, candidates, first.peer_id, now, 60)
        me.merge([first.put_learn("state", plan.to_dict(), None)])
        return service.current_state()

    assert follows_after(members[:2]).round_no == 3
    assert service.rejected == {"plan leaving out members that every node knew of": 1}
    star = dataclasses.replace(members[0], vector=profile_vector(dict.fromkeys(tasks.CATEGORIES, 1.0), 1.0),
                               performance=1.0)
    assert follows_after([star, *members[1:]]).round_no == 3
    assert service.rejected["plan stating another profile for a member than it published"] == 1
    assert follows_after(members).plan.matchmaker == first.peer_id


def test_a_joining_node_checks_a_state_against_the_ledgers_state_of_the_round_before(tmp_path: Path) -> None:
    """A node that followed no round yet checks a new state against the state of the round before that the
    ledger still holds (real ledgers; the RPC registry is a stand-in, as above)."""
    from types import SimpleNamespace

    from knexa.crdt.ledger import Ledger
    from knexa.node.learn.service import LearnService
    from tests.crdt_helpers import KEY_PAIRS

    me, first, second, liar = (Ledger(KEY_PAIRS[i]) for i in range(4))
    now = int(time.time() * 1000)
    before = _state_at(3, first.peer_id, now)
    closed, _ = close_round(before, {})
    me.merge([first.put_learn("state", before.to_dict(), None),
              *(ledger.put_learn("member", {"accuracy": 0.5, "skills": {}, "round": 3}, None)
                for ledger in (first, second))])
    service = LearnService(SimpleNamespace(register=lambda *a: None), None, me.peer_id, lambda: None,
                           lambda: me, lambda entries: None, tmp_path)
    taught = LinUCB.from_dict(closed.bandit.to_dict())
    taught.b[0] += 1.0
    forged = next_plan(dataclasses.replace(closed, bandit=taught), _candidates(4), liar.peer_id, now + 1, 60)
    me.merge([liar.put_learn("state", forged.to_dict(), None)])
    assert service.current_state().plan.matchmaker == first.peer_id
    assert service.rejected == {"matchmaker state whose bandit is not its rewards' result": 1}
    honest = next_plan(closed, _candidates(4), second.peer_id, now + 2, 60)
    me.merge([second.put_learn("state", honest.to_dict(), None)])
    assert service.current_state().plan.matchmaker == second.peer_id and service.states_checked == 1


def test_the_bandit_learns_from_loss_drops_and_malformed_rewards_are_refused() -> None:
    state = _planned()
    first, second = state.plan.pairs
    closed, _ = close_round(state, {
        first.student: RewardReport(1, first.student, first.teacher, 0.5, 0.9, True, 0.0),
        second.student: RewardReport(1, second.student, second.teacher, 0.0, 0.4, False, 0.3),
    })
    by_student = {r[0]: r for r in closed.history[-1].rewards}
    # Gains play no part; each drop counts against the round's mean drop.
    assert by_student[first.student][3] == pytest.approx(-0.15) and by_student[second.student][3] == pytest.approx(0.15)
    assert closed.scaler.count == 2 and closed.scaler.mean == pytest.approx(0.15)
    # A later round where every loss falls by less: the better pairing of the two still earns the positive reward.
    replanned = next_plan(closed, _candidates(4), "peer01", now_ms=5_000, round_deadline_s=60)
    first, second = replanned.plan.pairs
    later, _ = close_round(replanned, {
        first.student: RewardReport(2, first.student, first.teacher, 0.0, 0.9, False, 0.01),
        second.student: RewardReport(2, second.student, second.teacher, 0.0, 0.4, False, 0.03),
    })
    by_student = {r[0]: r[3] for r in later.history[-1].rewards}
    assert by_student[second.student] > 0 > by_student[first.student]
    assert by_student[second.student] == pytest.approx(-by_student[first.student])
    # A first round of one pair: nothing to compare its drop with. Recorded, sets the scale, moves no estimate.
    only = state.plan.pairs[0]
    lone_first, _ = close_round(state, {only.student: RewardReport(1, only.student, only.teacher, 0.0, 0.9, False,
                                                                   2.5)})
    assert lone_first.history[-1].rewards[0][2:] == (2.5, 0.0)
    assert lone_first.bandit.updates == 0 and lone_first.scaler.count == 1
    # A later round of one pair has no other pairing to compare with: its drop counts against the running mean.
    lone, _ = close_round(replanned, {first.student: RewardReport(2, first.student, first.teacher, 0.0, 0.9, False,
                                                                  0.5)})
    assert lone.history[-1].rewards[0][3] == pytest.approx((0.5 - 0.15) / math.sqrt(0.045))

    good = RewardReport(1, first.student, first.teacher, 0.1, 0.6, True, 0.25).to_dict()
    assert RewardReport.from_dict(good).loss_drop == 0.25
    for bad in ({k: v for k, v in good.items() if k != "loss_drop"}, {**good, "loss_drop": 1e9},
                {**good, "loss_drop": "0.1"}, {**good, "loss_drop": True}, {**good, "loss_drop": float("nan")}):
        with pytest.raises(ValueError):
            RewardReport.from_dict(bad)
    record = closed.to_dict()
    for rewards in ([[first.student, 0.5, 0.0]], [[first.student, 0.5, None, 0.0]],
                    [[first.student, 0.5, float("inf"), 0.0]], [[first.student, "0.5", 0.0, 0.0]]):
        record["history"][-1]["rewards"] = rewards  # an older node's 3-number layout, or junk
        with pytest.raises(ValueError):
            MatchmakerState.from_dict(record)


def test_only_the_assigned_teacher_may_send_a_transfer() -> None:
    plan = _planned().plan
    pair = plan.pairs[0]
    assert check_transfer(plan, pair.teacher, pair.student, 1) is None
    assert "not this node's assigned teacher" in check_transfer(plan, plan.pairs[1].teacher, pair.student, 1)
    assert "not a student" in check_transfer(plan, pair.student, pair.teacher, 1)
    assert "not the open round" in check_transfer(plan, pair.teacher, pair.student, 2)
    assert "not the open round" in check_transfer(None, pair.teacher, pair.student, 1)
    # A transfer ahead of the plan this node holds is tried again; one for an earlier round is over.
    assert round_timing(plan, 1) == "open" and round_timing(plan, 2) == "ahead" and round_timing(None, 1) == "ahead"
    assert round_timing(dataclasses.replace(plan, round_no=3), 2) == "over"
    # A teacher whose student has reported (say, it restarted after teaching) does not teach again.
    done = {pair.student: RewardReport(1, pair.student, pair.teacher, 0.0, 0.5, False, 0.1)}
    assert reported(plan, pair.student, done) and not reported(plan, plan.pairs[1].student, done)
    assert not reported(plan, pair.student, {pair.student: dataclasses.replace(done[pair.student], round_no=2)})


def test_cli_renders_status_and_rounds_with_explanations() -> None:
    from rich.console import Console

    from knexa.cli.learn import print_learn, print_rounds
    from knexa.cli.render import _learn_line

    state = _planned()
    closed, _ = close_round(state, {p.student: RewardReport(1, p.student, p.teacher, 0.1, 0.5, True, 0.2)
                                    for p in state.plan.pairs})
    reopened = next_plan(closed, _candidates(4), "peer01", now_ms=5_000, round_deadline_s=60)
    view = {
        "round": 2, "history": [r.to_dict() for r in reopened.history], "open": reopened.plan.to_dict(),
        "this_node": [{"round": 1, "role": "student", "partner": "peer00", "gain": 0.1, "loss_drop": 0.0312,
                       "swapped": True},
                      {"round": 2, "role": "teacher", "partner": "peer03", "sent": 4}],
        "explain": [{"teacher": "peer00", "student": "peer01", "mean": 0.1, "width": 0.5, "ucb": 0.6,
                     "lead": {"units": 0.25, "dates": 0.5}}],
    }
    status = {"phase": "enrolled", "adapter": "learned",
              "examples": {"train": 8, "validation": 2, "shared_validation": 16},
              "accuracy": 0.5, "skills": {"dates": 1.0}, "members": ["a", "b"], "round": 2,
              "role": {"role": "teacher", "teacher": "a", "student": "b"}, "last_error": None,
              "states_checked": 3, "rejected": {"matchmaker state dated in the future": 1},
              "local_training": {"training": {"steps": 4, "first_loss": 3.0, "last_loss": 1.0},
                                 "accuracy_before": 0.0, "accuracy_after": 0.5, "loss_before": 2.5,
                                 "loss_after": 1.25, "swapped": True}}
    console = Console(record=True, width=200)
    print_rounds(console, view, explain=True)
    print_learn(console, status)
    text = console.export_text()
    assert "+0.100" in text and "open" in text and "LinUCB scores for round 3" in text
    assert "dates +0.50, units +0.25" in text
    assert "loss drop +0.0312" in text and "+0.2000" in text  # this node's and the history's loss drops
    assert "validation 0.000 -> 0.500 (loss 2.500 -> 1.250): kept" in text and "2 validation (+ 16 shared)" in text
    assert "checked against the rewards they learned from: 3" in text
    assert "refused: matchmaker state dated in the future (1)" in text
    assert _learn_line(status) == "enrolled, validation accuracy 0.50, 2 members, round 2 (teacher)"
    assert _learn_line({**status, "phase": "idle"}).startswith("not enrolled")


def test_a_large_state_drops_old_history_to_fit_one_ledger_entry() -> None:
    from knexa.node.learn.rounds import fit_state

    candidates = _candidates(60)
    state = MatchmakerState.initial()
    for round_no in range(1, 21):
        state = next_plan(state, candidates, "peer00", now_ms=round_no, round_deadline_s=60)
        state, _ = close_round(state, {p.student: RewardReport(round_no, p.student, p.teacher, 0.01, 0.5, False, 0.2)
                                       for p in state.plan.pairs})
    state = next_plan(state, candidates, "peer00", now_ms=99, round_deadline_s=60)
    assert len(msgpack.packb(state.to_dict())) > 48 * 1024 and len(state.history) == 20
    fitted = fit_state(state, 48 * 1024)
    assert len(msgpack.packb(fitted.to_dict())) <= 48 * 1024
    assert fitted.plan == state.plan and fitted.bandit is state.bandit
    assert 0 < len(fitted.history) < 20 and fitted.history[-1] == state.history[-1]
    small = _planned()
    assert fit_state(small, 48 * 1024) is small  # nothing to drop


def test_a_bad_ledger_record_is_counted_once_however_often_it_is_read(tmp_path: Path) -> None:
    """The service reads the ledger's learning records on every tick; a stale or bad one must not make the
    rejection counts in `learn` status climb for ever. Real ledgers; no engine or network (the service's
    RPC registry is a stand-in, since only the record-reading path is under test)."""
    from types import SimpleNamespace

    from knexa.crdt.ledger import Ledger
    from knexa.node.learn.service import LearnService
    from tests.crdt_helpers import KEY_PAIRS

    me, peer_a, peer_b = (Ledger(KEY_PAIRS[i]) for i in range(3))
    old_layout = {**MatchmakerState.initial().to_dict(), "bandit": LinUCB(2 * node_dim()).to_dict()}
    me.merge([peer_a.put_learn("state", old_layout, None),
              peer_b.put_learn("member", {"accuracy": 7, "skills": {}}, None),
              peer_b.put_learn("reward", {"round": 1}, None)])
    service = LearnService(SimpleNamespace(register=lambda *a: None), None, me.peer_id, lambda: None,
                           lambda: me, lambda entries: None, tmp_path)
    for _ in range(5):
        assert service.current_state() is None and service.members() == {} and service.rewards() == {}
    assert service.rejected == {"bad matchmaker state": 1, "bad member record": 1, "bad reward record": 1}
    me.merge([peer_a.put_learn("state", {**old_layout, "round": 3}, None)])  # a new version of the bad record
    service.current_state()
    assert service.rejected["bad matchmaker state"] == 2
    # A well-formed state whose plan names another matchmaker than its author: refused for that reason.
    planned = _planned()
    me.merge([peer_a.put_learn("state", planned.to_dict(), None)])
    for _ in range(3):
        assert service.current_state() is None
    assert service.rejected["state naming another matchmaker"] == 1
    good = next_plan(MatchmakerState.initial(), _candidates(4), peer_b.peer_id, now_ms=1, round_deadline_s=60)
    me.merge([peer_b.put_learn("state", good.to_dict(), None)])
    assert service.current_state() is service.current_state()  # parsed once, while its version stands
    assert service.current_state().to_dict() == good.to_dict()


def test_parsed_records_parse_each_version_once_and_forget_the_oldest() -> None:
    from knexa.crdt.ledger import Ledger
    from knexa.node.learn.records import ParsedRecords, RecordRefused
    from tests.crdt_helpers import KEY_PAIRS

    calls: list[object] = []
    bad: list[str] = []

    def parse(author: str, record: object) -> int:
        calls.append(record)
        if record == {"n": -1}:
            raise RecordRefused("negative")
        return record["n"]  # type: ignore[index]

    ledger = Ledger(KEY_PAIRS[0])
    records = ParsedRecords(parse, "bad", bad.append, max_versions=3)
    first = ledger.put_learn("t", {"n": 1}, None)
    assert records.read({"a": first}) == {"a": 1} and records.read({"a": first}) == {"a": 1} and len(calls) == 1
    refused, malformed = ledger.put_learn("t", {"n": -1}, None), ledger.put_learn("t", {"m": 2}, None)
    for _ in range(3):
        assert records.read({"b": refused, "c": malformed}) == {}
    assert bad == ["negative", "bad"] and len(calls) == 3
    assert records.read({"a": ledger.put_learn("t", {"n": 3}, None)}) == {"a": 3}  # a 4th version: over the cap
    records.read({"a": first})  # the least recently read version was forgotten: parsed again
    assert len(calls) == 5


async def test_a_given_transfer_file_is_read_once_a_round_and_again_when_it_changes(tmp_path: Path,
                                                                                    monkeypatch) -> None:
    """A student checks every transfer it receives against the round's public prompts; it must not read a
    file of up to 64 MiB again for each. (No engine or network: the RPC registry is a stand-in.)"""
    from types import SimpleNamespace

    from knexa.crdt.ledger import Ledger
    from knexa.node.learn.service import LearnService
    from knexa.node.learn.settings import LearnSettings
    from tests.crdt_helpers import KEY_PAIRS

    given = tmp_path / "transfer.jsonl"
    given.write_text("".join(json.dumps({"prompt": f"question {i}"}) + "\n" for i in range(10)))
    me = Ledger(KEY_PAIRS[0])
    service = LearnService(SimpleNamespace(register=lambda *a: None), None, me.peer_id, lambda: None,
                           lambda: me, lambda entries: None, tmp_path,
                           settings=LearnSettings(transfer_file=str(given), transfer_prompts=4))
    reads = []
    real_load = tasks.load_prompts
    monkeypatch.setattr(tasks, "load_prompts", lambda path: reads.append(path) or real_load(path))
    first = await service._transfer_prompts(3)
    assert len(first) == 4 and all(p.startswith("question") for p in first)
    assert await service._transfer_prompts(3) == first and len(reads) == 1
    await service._transfer_prompts(4)  # the next round: its own draw
    assert len(reads) == 2
    given.write_text("".join(json.dumps({"prompt": f"other {i}"}) + "\n" for i in range(12)))
    assert all(p.startswith("other") for p in await service._transfer_prompts(4)) and len(reads) == 3
    given.unlink()
    with pytest.raises(tasks.DataError, match="cannot read"):
        await service._transfer_prompts(4)


async def test_the_shipped_transfer_set_is_of_the_configured_family(tmp_path: Path) -> None:
    """(No engine or network: the RPC registry is a stand-in.)"""
    from types import SimpleNamespace

    from knexa.crdt.ledger import Ledger
    from knexa.node.learn.service import LearnService
    from knexa.node.learn.settings import LearnSettings
    from tests.crdt_helpers import KEY_PAIRS

    me = Ledger(KEY_PAIRS[0])
    for family in tasks.FAMILIES:
        service = LearnService(SimpleNamespace(register=lambda *a: None), None, me.peer_id, lambda: None,
                               lambda: me, lambda entries: None, tmp_path,
                               settings=LearnSettings(task_family=family, transfer_prompts=8))
        assert await service._transfer_prompts(3) == tasks.transfer_set(8, 3, family)


def test_a_shadow_validates_better_by_accuracy_then_at_equal_accuracy_by_loss() -> None:
    from knexa.node.learn.agent import Evaluation, validates_better

    def ev(accuracy: float, loss: float | None) -> Evaluation:
        return Evaluation(accuracy, {}, (), loss)

    assert validates_better(ev(0.5, 2.0), ev(0.4, 1.0))  # more accurate wins, whatever the loss
    assert not validates_better(ev(0.4, 1.0), ev(0.5, 2.0))
    assert validates_better(ev(0.5, 1.0), ev(0.5, 1.1))  # a tie goes to the lower loss
    assert not validates_better(ev(0.5, 1.1), ev(0.5, 1.0))
    assert not validates_better(ev(0.5, 1.0), ev(0.5, 1.0))  # nothing better: the live adapter stays
    assert not validates_better(ev(0.5, None), ev(0.5, 1.0))  # no loss measured: a tie stays a tie


def test_alike_members_are_paired_differently_from_round_to_round_and_every_node_agrees() -> None:
    # Members with the same profile score alike on every pair: were ties broken by id, the same pairs would be
    # tried every round and the others never.
    alike = [Candidate(f"peer{i:02d}", profile_vector({}, 0.0), 0.0) for i in range(4)]
    bandit = new_bandit()
    matchings = set()
    for round_no in range(1, 13):
        pairs = plan_pairs(alike, bandit, round_no)
        assert choice_rejection(pairs, bandit, round_no) is None
        assert plan_pairs(list(reversed(alike)), bandit, round_no) == pairs  # whatever order a node lists them
        matchings.add(frozenset(frozenset((p.teacher, p.student)) for p in pairs))
    assert len(matchings) == 3  # every way to pair four members
