"""How much can pairing matter? Every possible teacher/student pair of one round, measured.

    python bench/distill_pairs.py --threads 2 --agents 6 --first-seed 0 --json out.json

bench/distill.py compares matchmakers by running them; this measures what any matchmaker could gain. From the
same locally warmed-up adapters as bench/distill.py (same seeds, population and training budget), it trains
every agent alone (twice, with two training seeds: the noise of one training run), and every student with
every possible teacher (oriented as the daemon orients a pair: the better validator teaches), one round. Each
pair's benefit is its student's test accuracy less the same student's after training alone. A matching's
test accuracy is then the mean over agents (teachers and unpaired agents train alone, as in the benchmark),
so every perfect matching's value follows without running it:
- random: the mean over all matchings (what random pairing gets on average);
- best and worst: what an oracle that knew every pair's outcome could get, and the floor;
- lead: the matching LinUCB picks in round 1 (its prior: the teacher's per-category lead);
- by loss drop: the matching with the largest summed validation-loss drop (the daemon's reward), i.e. what a
  matchmaker that had learned its reward perfectly would pick.
Test accuracy is counted two ways: of the live adapter (the shadow replaces it only if it validates better,
as in the daemon and the benchmark) and of the shadow itself, kept or not (what the teacher's answers did).
Every teacher's answers to the transfer set are graded too (the benchmark's transfer prompts have known
answers; the daemon's need not), and so are the ones the answer filter passes to each student.

    python bench/distill_pairs.py --threads 2 --agents 6 --teachers-only --seeds 4   # the grading alone
    python bench/distill_pairs.py --merge out.json other.json                         # report over runs
    python bench/distill_pairs.py --threads 2 --agents 6 --votes 5 --filter lead+voted --alone out.json \
        --json voted.json                                 # the pairs again, learning only agreed answers
    python bench/distill_pairs.py --merge voted.json --baseline out.json              # pair by pair
    python bench/distill_pairs.py --threads 2 --agents 6 --answers self --alone out.json --json self.json
                                                      # students learn their own answers to the same prompts
    python bench/distill_pairs.py --threads 2 --agents 6 --filter lead+strong --alone out.json --json strong.json
                                                      # only answers where the teacher validated at 0.5 or better
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import trio
from distill import (
    Agent,
    common_arguments,
    engine_config,
    make_agents,
    own_examples,
    train,
    warm_up,
    with_defaults,
)

from knexa.node.engine import Engine
from knexa.node.learn import agent as learner
from knexa.node.learn import tasks
from knexa.node.learn.linucb import new_bandit, oriented, plan_pairs, teacher_lead
from knexa.node.learn.rounds import alpha_for

ROUND = 1


@dataclass
class PairOutcome:
    teacher: int
    student: int
    lead: float
    loss_drop: float
    val_gain: float
    kept: bool
    live_test: float
    shadow_test: float
    # The loss drop on the shared validation examples only, and on the student's own split only (the
    # daemon's reward is the drop on both together): which of them tracks what the student gains.
    shared_drop: float | None = None
    own_drop: float | None = None


@dataclass
class AgentOutcome:
    base_test: float
    alone_live_test: float
    alone_shadow_test: float
    repeat_live_test: float
    repeat_shadow_test: float


def matchings(members: Sequence[int]) -> Iterator[list[tuple[int, int]]]:
    """Every set of floor(N/2) disjoint pairs of the members (with N odd, one of them is left out)."""
    if len(members) < 2:
        yield []
        return
    first, rest = members[0], members[1:]
    for i, other in enumerate(rest):
        for tail in matchings(rest[:i] + rest[i + 1:]):
            yield [(first, other), *tail]
    if len(members) % 2:
        yield from matchings(rest)


def ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2
        i = j + 1
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    try:
        return statistics.correlation(ranks(x), ranks(y))
    except statistics.StatisticsError:  # one of them constant
        return float("nan")


async def test_accuracy(engine: Engine, adapter: str, test: list[tasks.Example], args: argparse.Namespace
                        ) -> float:
    return (await learner.evaluate(engine, adapter, test, concurrency=args.concurrency, with_loss=False)).accuracy


async def fresh(engine: Engine, a: Agent, name: str, warm: Path, evaluation: learner.Evaluation) -> None:
    """The agent's live adapter back at its warmed-up weights (whose validation is `evaluation`), under a new
    name."""
    a.live, a.evaluation = name, evaluation
    await engine.load_adapter(name, warm / a.name)


async def drop(engine: Engine, a: Agent, trained: bool = True) -> None:
    await engine.unload_adapter(a.live)
    if trained:
        await engine.unload_adapter(learner.shadow_of(a.live))


def split_drop(before: learner.Evaluation, after: learner.Evaluation, shared: int) -> tuple[float, float]:
    """The drop in mean answer loss on the shared validation examples (the last `shared`) and on the rest."""
    def drop_of(part: slice) -> float:
        return statistics.fmean(before.losses[part]) - statistics.fmean(after.losses[part])

    cut = len(before.losses) - shared
    return drop_of(slice(cut, None)), drop_of(slice(None, cut))


async def train_and_test(engine: Engine, a: Agent, examples: list, test: list[tasks.Example],
                         args: argparse.Namespace, seed: int, base_test: float
                         ) -> tuple[learner.TrainOutcome, float, float]:
    outcome = await train(engine, a, examples, args.steps, args, seed)
    shadow = await test_accuracy(engine, learner.shadow_of(a.live), test, args)
    return outcome, (shadow if outcome.swapped else base_test), shadow


async def alone_outcomes(engine: Engine, agents: list[Agent], evaluations: dict[int, learner.Evaluation],
                         test: list[tasks.Example], warm: Path, args: argparse.Namespace, seed: int
                         ) -> dict[int, AgentOutcome]:
    alone = {}
    for a in agents:
        await fresh(engine, a, f"base{a.index}", warm, evaluations[a.index])
        base = await test_accuracy(engine, a.live, test, args)
        await drop(engine, a, trained=False)
        runs = []
        for repeat, train_seed in enumerate((seed + ROUND, seed + ROUND + 100)):
            await fresh(engine, a, f"alone{a.index}-{repeat}", warm, evaluations[a.index])
            runs.append((await train_and_test(engine, a, own_examples(a), test, args, train_seed, base))[1:])
            await drop(engine, a)
        alone[a.index] = AgentOutcome(base, *runs[0], *runs[1])
        print(f"  agent{a.index}: test {base:.3f} warmed up; alone {runs[0][0]:.3f} (shadow {runs[0][1]:.3f}), "
              f"again {runs[1][0]:.3f} (shadow {runs[1][1]:.3f})", flush=True)
    return alone


async def reused_alone(engine: Engine, agents: list[Agent], test: list[tasks.Example], warm: Path,
                       args: argparse.Namespace, seed: int, earlier: dict[int, dict]) -> dict[int, AgentOutcome]:
    """The alone outcomes of an earlier run of this seed (`--alone`): a filter changes only the pairs. The
    warmed-up adapters must test as they did then, or the earlier training runs are not this run's; one or two
    greedy answers may differ (bfloat16 batches of another composition: another process on the cores changes
    which requests are decoded together), more may not."""
    if seed not in earlier or not earlier[seed].get("agents"):
        raise SystemExit(f"--alone: no alone outcomes of seed {seed} in {args.alone}")
    alone = {int(i): AgentOutcome(**o) for i, o in earlier[seed]["agents"].items()}
    for a in agents:
        await fresh(engine, a, f"base{a.index}", warm, a.evaluation)
        base = await test_accuracy(engine, a.live, test, args)
        await drop(engine, a, trained=False)
        differ = round(abs(base - alone[a.index].base_test) * len(test))
        if differ:
            print(f"  agent{a.index} warmed up tests {base:.3f}, in the earlier run {alone[a.index].base_test:.3f}",
                  flush=True)
        if differ > 2:
            raise SystemExit(f"--alone: agent{a.index} of seed {seed} answers {differ} test prompts otherwise than "
                             "in the earlier run: not the same warm-up")
    print(f"  alone outcomes of seed {seed} reused", flush=True)
    return alone


async def run_seed(engine: Engine, args: argparse.Namespace, seed: int, scratch: Path,
                   earlier: dict[int, dict]) -> dict:
    agents, test = make_agents(args, seed)
    warm = scratch / f"warm-{seed}"
    started = time.perf_counter()
    print(f"seed {seed}: {len(agents)} agents, train sizes {[len(a.train) for a in agents]}, test {len(test)}",
          flush=True)
    await warm_up(engine, agents, args, seed, warm)
    # Training changes an agent's evaluation: the profiles the pairs are oriented and scored by are taken
    # before any of it, as the benchmark's round 1 takes them.
    evaluations, candidates = {}, {}
    for a in agents:
        await engine.load_adapter(a.name, warm / a.name)
        a.evaluation = evaluations[a.index] = await learner.evaluate(engine, a.name, a.val,
                                                                     concurrency=args.concurrency)
        candidates[a.index] = a.candidate()
        await engine.unload_adapter(a.name)
    if args.teachers_only:
        alone = {}
    elif args.alone:
        alone = await reused_alone(engine, agents, test, warm, args, seed, earlier)
    else:
        alone = await alone_outcomes(engine, agents, evaluations, test, warm, args, seed)
    transfer = tasks.transfer_examples(args.transfer, seed * 1000 + ROUND, args.family)
    prompts = [e.prompt for e in transfer]
    reference = {e.prompt: e for e in transfer}
    answers, voted_answers, teachers = {}, {}, {}
    for a in agents:
        await fresh(engine, a, f"teacher{a.index}", warm, evaluations[a.index])
        samples = [await learner.teacher_answers(engine, a.live, prompts, args.teacher_tokens,
                                                 seed=seed * 7919 + ROUND + vote * learner.VOTE_SEED_STRIDE,
                                                 concurrency=args.concurrency)
                   for vote in range(args.votes)]
        answers[a.index] = samples[0]
        await drop(engine, a, trained=False)
        right = [tasks.grade(e, answer) for e, answer in zip(transfer, answers[a.index], strict=True)]
        voted = [tasks.majority(outputs) for outputs in zip(*samples, strict=True)]
        voted_answers[a.index] = [v or "" for v in voted]
        teachers[a.index] = {
            "validation": evaluations[a.index].accuracy, "skills": evaluations[a.index].skills,
            "right": sum(right), "answers": len(right), "categories": [e.category for e in transfer],
            "each_right": right,
            "voted": [v is not None for v in voted],
            "voted_right": [v is not None and tasks.grade(e, v) for e, v in zip(transfer, voted, strict=True)],
        }
        print(f"  agent{a.index} (validation {evaluations[a.index].accuracy:.3f}) answers {sum(right)} of "
              f"{len(right)} transfer prompts right; {args.votes} samples agree on "
              f"{sum(teachers[a.index]['voted'])}, {sum(teachers[a.index]['voted_right'])} of those right",
              flush=True)
    pairs: list[PairOutcome] = []
    filtered = []
    by_name = {a.name: a for a in agents}
    for first, second in itertools.combinations(agents, 2):
        teacher, student = oriented(candidates[first.index], candidates[second.index])
        t, s = by_name[teacher.peer_id], by_name[student.peer_id]
        lead = sum(teacher_lead(teacher.vector, student.vector).values())
        given = voted_answers[t.index] if args.filter == "lead+voted" else answers[t.index]
        useful = tasks.answers_worth_learning(zip(prompts, given, strict=True), evaluations[t.index].skills,
                                              evaluations[s.index].skills)
        if args.filter == "lead+strong":
            useful = [(prompt, answer) for prompt, answer in useful
                      if evaluations[t.index].skills.get(tasks.category_of(prompt), 0.0) >= STRONG_SKILL]
        if args.answers == "self":
            # The control: the same prompts, answered by the student itself, sampled as a teacher samples.
            own = dict(zip(prompts, answers[s.index], strict=True))
            useful = [(prompt, own[prompt]) for prompt, _ in useful if own[prompt]]
        right = sum(tasks.grade(reference[prompt], answer) for prompt, answer in useful)
        filtered.append({"teacher": t.index, "student": s.index, "lead": lead, "answers": len(useful),
                         "right": right})
        if args.teachers_only:
            continue
        await fresh(engine, s, f"student{s.index}-of-{t.index}", warm, evaluations[s.index])
        examples = learner.mixed_examples(s.train, useful, alpha_for(ROUND))
        outcome, live, shadow = await train_and_test(engine, s, examples, test, args, seed + ROUND,
                                                     alone[s.index].base_test)
        await drop(engine, s)
        pairs.append(PairOutcome(t.index, s.index, lead, outcome.loss_drop, outcome.gain, outcome.swapped, live,
                                 shadow, *split_drop(outcome.before, outcome.after,
                                                     args.public_val * len(tasks.CATEGORIES))))
        print(f"  agent{t.index} -> agent{s.index}: lead {lead:.2f}, {len(useful)} answers ({right} right), loss "
              f"drop {outcome.loss_drop:+.4f}, val gain {outcome.gain:+.3f}{' kept' if outcome.swapped else ''}, "
              f"test {live:.3f} (shadow {shadow:.3f}; alone {alone[s.index].alone_live_test:.3f}, shadow "
              f"{alone[s.index].alone_shadow_test:.3f})", flush=True)
    result = {"seed": seed, "agents": {i: asdict(o) for i, o in alone.items()},
              "pairs": [asdict(p) for p in pairs], "teachers": teachers, "filtered": filtered,
              "lead_choice": [(int(p.teacher.removeprefix("agent")), int(p.student.removeprefix("agent")))
                              for p in plan_pairs(list(candidates.values()), new_bandit(), ROUND)],
              "seconds": time.perf_counter() - started}
    summarise(result)
    return result


def pair_table(result: dict) -> dict[frozenset[int], dict]:
    return {frozenset((p["teacher"], p["student"])): p for p in result["pairs"]}


def matching_values(result: dict, measure: str) -> dict[tuple[frozenset[int], ...], float]:
    """Test accuracy (live or shadow) of every matching: students as paired, everyone else as alone."""
    alone = {int(i): o[f"alone_{measure}_test"] for i, o in result["agents"].items()}
    table = pair_table(result)
    values = {}
    for matching in matchings(sorted(alone)):
        scores = dict(alone)
        for a, b in matching:
            p = table[frozenset((a, b))]
            scores[p["student"]] = p[f"{measure}_test"]
        values[tuple(frozenset(pair) for pair in matching)] = statistics.fmean(scores.values())
    return values


def filter_precision(result: dict, keep: str) -> tuple[float, float]:
    """Answers a pair's student would get under one filter, and the share of them right, over all pairs:
    lead (the daemon's: categories where the teacher validated better than its student), strong (where the
    teacher validated at 0.5 or better), voted (where most samples agree), lead+voted."""
    teachers = {int(i): t for i, t in result["teachers"].items()}
    kept = right = 0
    for f in result["filtered"]:
        t, s = teachers[f["teacher"]], teachers[f["student"]]
        for i, category in enumerate(t["categories"]):
            lead = t["skills"].get(category, 0.0) > s["skills"].get(category, 0.0)
            passes = {"lead": lead, "strong": t["skills"].get(category, 0.0) >= STRONG_SKILL, "voted": t["voted"][i],
                      "lead+voted": lead and t["voted"][i]}[keep]
            if passes:
                kept += 1
                right += t["voted_right"][i] if "voted" in keep else t["each_right"][i]
    pairs = len(result["filtered"])
    return kept / pairs, (right / kept if kept else float("nan"))


FILTERS = ("lead", "strong", "voted", "lead+voted")
STRONG_SKILL = 0.5  # a teacher's validation accuracy in a category for its answers there to count as strong


def teacher_summary(result: dict) -> dict:
    """How right the teachers' answers are: all of them, and those the answer filter passes to a student."""
    teachers, filtered = result["teachers"], result["filtered"]
    lead_pairs = {tuple(pair) for pair in result["lead_choice"]}
    chosen = [f for f in filtered if (f["teacher"], f["student"]) in lead_pairs]

    def precision(rows: list[dict]) -> float:
        answers = sum(f["answers"] for f in rows)
        return sum(f["right"] for f in rows) / answers if answers else float("nan")

    summary = {
        "teacher_accuracy": sum(t["right"] for t in teachers.values()) / sum(t["answers"] for t in teachers.values()),
        "filtered_precision": precision(filtered), "lead_choice_precision": precision(chosen),
        "filtered_answers": statistics.fmean(f["answers"] for f in filtered),
        "spearman_lead_answers": spearman([f["lead"] for f in filtered], [f["answers"] for f in filtered]),
        "spearman_lead_right": spearman([f["lead"] for f in filtered], [f["right"] for f in filtered]),
    }
    for keep in FILTERS:
        summary[f"{keep}_answers"], summary[f"{keep}_precision"] = filter_precision(result, keep)
    print(f"  teachers: {summary['teacher_accuracy']:.3f} of their transfer answers right; the filter passes "
          f"{summary['filtered_answers']:.1f} a pair, {summary['filtered_precision']:.3f} of them right "
          f"({summary['lead_choice_precision']:.3f} in LinUCB's round-1 pairs); Spearman of lead with answers "
          f"passed {summary['spearman_lead_answers']:+.2f}, with right answers passed "
          f"{summary['spearman_lead_right']:+.2f}", flush=True)
    print("  filters: " + ", ".join(f"{keep} {summary[f'{keep}_answers']:.1f} a pair, "
                                    f"{summary[f'{keep}_precision']:.3f} right" for keep in FILTERS), flush=True)
    return summary


def matching_summary(result: dict) -> dict:
    table = pair_table(result)
    agents = {int(i): o for i, o in result["agents"].items()}
    lead_key = tuple(frozenset(pair) for pair in result["lead_choice"])
    summary = {}
    for measure in ("live", "shadow"):
        values = matching_values(result, measure)
        by_drop = max(values, key=lambda m: sum(table[pair]["loss_drop"] for pair in m))
        lead_value = next(v for m, v in values.items() if set(m) == set(lead_key))
        noise = [o[f"alone_{measure}_test"] - o[f"repeat_{measure}_test"] for o in agents.values()]
        benefit = [p[f"{measure}_test"] - agents[p["student"]][f"alone_{measure}_test"] for p in result["pairs"]]
        summary[measure] = {
            "alone": statistics.fmean(o[f"alone_{measure}_test"] for o in agents.values()),
            "random": statistics.fmean(values.values()), "best": max(values.values()),
            "worst": min(values.values()), "lead": lead_value, "by_loss_drop": values[by_drop],
            "matchings": len(values),
            "alone_repeat_sd": statistics.pstdev(noise) / 2 ** 0.5,
            "spearman_lead_benefit": spearman([p["lead"] for p in result["pairs"]], benefit),
            "spearman_loss_drop_benefit": spearman([p["loss_drop"] for p in result["pairs"]], benefit),
            "mean_benefit": statistics.fmean(benefit),
        }
        if all(p.get("shared_drop") is not None for p in result["pairs"]):
            for part in ("shared", "own"):
                summary[measure][f"spearman_{part}_drop_benefit"] = spearman(
                    [p[f"{part}_drop"] for p in result["pairs"]], benefit)
            print(f"  {measure:6s}: Spearman of a pair's benefit with its loss drop on the shared validation "
                  f"examples {summary[measure]['spearman_shared_drop_benefit']:+.2f}, on the student's own split "
                  f"{summary[measure]['spearman_own_drop_benefit']:+.2f}", flush=True)
        s = summary[measure]
        print(f"  {measure:6s}: everyone alone {s['alone']:.3f}, random {s['random']:.3f}, best {s['best']:.3f}, "
              f"worst {s['worst']:.3f}, "
              f"lead (LinUCB round 1) {s['lead']:.3f}, by loss drop {s['by_loss_drop']:.3f} over "
              f"{s['matchings']} matchings; a pair's benefit over training alone: mean {s['mean_benefit']:+.3f}, "
              f"Spearman with lead {s['spearman_lead_benefit']:+.2f}, with loss drop "
              f"{s['spearman_loss_drop_benefit']:+.2f}; one agent's test accuracy alone, two training seeds: "
              f"SD {s['alone_repeat_sd']:.3f}", flush=True)
    return summary


def summarise(result: dict) -> None:
    result["summary"] = {}
    if result.get("pairs"):
        result["summary"].update(matching_summary(result))
    if result.get("teachers"):
        result["summary"]["teachers"] = teacher_summary(result)


def report(results: list[dict]) -> None:
    print(f"\nover {len(results)} seed(s):")
    for measure in ("live", "shadow"):
        rows = [r["summary"][measure] for r in results if measure in r["summary"]]
        if not rows:
            continue
        shared = set.intersection(*(set(row) for row in rows)) - {"matchings"}  # runs of other versions
        mean = {k: statistics.fmean(row[k] for row in rows) for k in shared}
        print(f"  test accuracy of a round-1 matching, {measure:6s} ({len(rows)} seed(s)): everyone alone "
              f"{mean['alone']:.3f}, random {mean['random']:.3f}, best {mean['best']:.3f} "
              f"(+{mean['best'] - mean['random']:.3f}), worst "
              f"{mean['worst']:.3f}, lead {mean['lead']:.3f} ({mean['lead'] - mean['random']:+.3f}), by loss drop "
              f"{mean['by_loss_drop']:.3f} ({mean['by_loss_drop'] - mean['random']:+.3f}); Spearman(lead, benefit) "
              f"{mean['spearman_lead_benefit']:+.2f}, Spearman(loss drop, benefit) "
              f"{mean['spearman_loss_drop_benefit']:+.2f}; alone-repeat SD {mean['alone_repeat_sd']:.3f}")
    rows = [r["summary"]["teachers"] for r in results if "teachers" in r["summary"]]
    if rows:
        mean = {k: statistics.fmean(row[k] for row in rows) for k in rows[0]}
        print(f"  teachers ({len(rows)} seed(s)): {mean['teacher_accuracy']:.3f} of their answers right; the "
              f"filter passes {mean['filtered_answers']:.1f} a pair, {mean['filtered_precision']:.3f} of them right "
              f"({mean['lead_choice_precision']:.3f} in LinUCB's round-1 pairs); Spearman of lead with answers "
              f"passed {mean['spearman_lead_answers']:+.2f}, with right answers {mean['spearman_lead_right']:+.2f}")
        print("  filters: " + ", ".join(f"{keep} {mean[f'{keep}_answers']:.1f} a pair, "
                                        f"{mean[f'{keep}_precision']:.3f} right" for keep in FILTERS))


def promotion_report(results: list[dict]) -> None:
    """What the daemon's promotion tiebreak (`validates_better`: at equal validation accuracy, the lower loss)
    changes against accuracy alone, from every pair's measured validation gain, loss drop and tests."""
    diffs, changed = [], 0
    for r in results:
        for p in r["pairs"]:
            kept, by_accuracy = learner.improves(p["val_gain"], p["loss_drop"]), p["val_gain"] > 0
            if kept != by_accuracy:
                changed += 1
                shadow_minus_live = p["shadow_test"] - r["agents"][str(p["student"])]["base_test"]
                diffs.append(shadow_minus_live if kept else -shadow_minus_live)
            else:
                diffs.append(0.0)
    if len(diffs) < 2:
        return
    sem = statistics.stdev(diffs) / len(diffs) ** 0.5
    print(f"  promotion, {len(diffs)} pairs: a validation-accuracy tie broken by the loss changed {changed} "
          f"decisions, the test accuracy {statistics.fmean(diffs):+.4f} ± {sem:.4f} a pair (better in "
          f"{sum(d > 0 for d in diffs)}, worse in {sum(d < 0 for d in diffs)})")


def compare(baseline: list[dict], results: list[dict]) -> None:
    """Each pair against the same pair (seed, teacher, student) of the baseline runs: what another answer
    filter changed, with the pairs' own noise paired out."""
    before = {(r["seed"], p["teacher"], p["student"]): p for r in baseline for p in r["pairs"]}
    alone = {(r["seed"], int(i)): o for r in results for i, o in r["agents"].items()}
    rows = [(p, before[(r["seed"], p["teacher"], p["student"])], alone[(r["seed"], p["student"])])
            for r in results for p in r["pairs"] if (r["seed"], p["teacher"], p["student"]) in before]
    if len(rows) < 2:
        raise SystemExit("--baseline: fewer than two pairs in common")
    print(f"\nagainst the baseline, {len(rows)} pairs in common:")
    for measure in ("live", "shadow"):
        diffs = [p[f"{measure}_test"] - b[f"{measure}_test"] for p, b, _ in rows]
        mean, sem = statistics.fmean(diffs), statistics.stdev(diffs) / len(diffs) ** 0.5
        benefit = statistics.fmean(p[f"{measure}_test"] - o[f"alone_{measure}_test"] for p, _, o in rows)
        was = statistics.fmean(b[f"{measure}_test"] - o[f"alone_{measure}_test"] for _, b, o in rows)
        print(f"  {measure:6s}: a student's test accuracy {mean:+.3f} ± {sem:.3f} (standard error), better in "
              f"{sum(d > 0 for d in diffs)} pairs, worse in {sum(d < 0 for d in diffs)}; a pair's benefit over "
              f"training alone {benefit:+.3f} (baseline {was:+.3f})")
    kept = sum(p["kept"] for p, _, _ in rows), sum(b["kept"] for _, b, _ in rows)
    print(f"  shadows kept: {kept[0]} (baseline {kept[1]})")


def saved_seeds(paths: Sequence[str]) -> list[dict]:
    """The per-seed results of earlier runs' --json files."""
    return [seed for path in paths for seed in json.loads(Path(path).read_text())["seeds"]]


async def main(args: argparse.Namespace) -> list[dict]:
    results = []
    earlier = {r["seed"]: r for r in await trio.to_thread.run_sync(saved_seeds, args.alone or [])}
    with tempfile.TemporaryDirectory(prefix="knexa-pairs-") as scratch:
        async with Engine.open(engine_config(args)) as engine:
            status = engine.status()
            print(f"model {status['model']['name']} on {status['device']} ({status['dtype']})", flush=True)
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                results.append(await run_seed(engine, args, seed, Path(scratch), earlier))
                if args.json:
                    await trio.Path(args.json).write_text(json.dumps({"args": vars(args), "seeds": results},
                                                                     indent=1))
    report(results)
    return results


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_arguments(parser)
    parser.add_argument("--votes", type=int, default=1,
                        help="samples of each teacher answer, graded as one where more than half agree")
    parser.add_argument("--filter", choices=("lead", "lead+voted", "lead+strong"), default="lead",
                        help="the teacher answers a student learns: the daemon's (categories where the teacher "
                             "leads), or of those the ones most of --votes samples agree on, or those in "
                             f"categories the teacher validated at {STRONG_SKILL} or better")
    parser.add_argument("--answers", choices=("teacher", "self"), default="teacher",
                        help="self: each student learns its own sampled answers to the prompts its teacher's "
                             "filtered answers cover (a control: what the teacher's answers add beyond the prompts)")
    parser.add_argument("--alone", nargs="+", default=None, metavar="JSON",
                        help="take the alone outcomes from earlier runs' --json files instead of training them")
    parser.add_argument("--baseline", nargs="+", default=None, metavar="JSON",
                        help="with --merge: compare each pair with the same pair of these runs (another filter)")
    parser.add_argument("--teachers-only", action="store_true",
                        help="train no pair: grade the teachers' answers and what the answer filter passes")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="run nothing: report over earlier runs' --json files")
    args = with_defaults(parser.parse_args())
    if args.filter == "lead+voted" and args.votes < 3:
        parser.error("--filter lead+voted needs --votes 3 or more")
    return args


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.merge:
        merged = saved_seeds(arguments.merge)
        for seed_result in merged:
            summarise(seed_result)
        report(merged)
        promotion_report(merged)
        if arguments.baseline:
            compare(saved_seeds(arguments.baseline), merged)
    else:
        trio.run(main, arguments)
