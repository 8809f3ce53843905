"""How noisy are the profiles the matchmaker pairs agents by?

    python bench/profile_noise.py --threads 1 --agents 6 --family learnable --public-val 4 --first-seed 0 \
        --seeds 3 --json noise.json
    python bench/profile_noise.py --merge noise.json other.json [--pairs docs/distill/pairs6_learn_seed*.json]

From the same locally warmed-up adapters as bench/distill.py (same seeds, population and training budget), each
agent is graded on its own validation split, on a shared set of every category (up to --shared per category)
and on an independent, larger set of every category (--truth per category: the "true" skills). A profile is
then built as the daemon builds it, from the own split plus k shared examples per category, for several k, and
compared with the true skills: the mean absolute error of the per-category skills, how often the better
validator of a pair (who teaches) is also the better one on the truth set, and the correlation of the
teacher's summed per-category lead (what LinUCB's prior credits) with the true lead.

With --pairs (bench/distill_pairs.py results of the same seeds and configuration), it also reports the Spearman
correlation of each profile's lead with the pairs' measured benefit, and what the matching greedy by that lead
would gain over random pairing. The warm adapters must be the pairs study's for that to mean anything: the
report says whether the validation accuracies match.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import trio
from distill import common_arguments, engine_config, make_agents, warm_up, with_defaults
from distill_pairs import matching_values, spearman

from knexa.node.engine import Engine
from knexa.node.learn import agent as learner
from knexa.node.learn import tasks
from knexa.node.learn.tasks import CATEGORIES

Graded = list[tuple[str, bool]]  # (category, answered right), in the order of the set


async def grade_seed(engine: Engine, args: argparse.Namespace, seed: int, scratch: Path) -> dict[str, dict]:
    agents, _ = make_agents(args, seed)
    warm = scratch / f"warm{seed}"
    await warm_up(engine, agents, args, seed, warm)
    shared = tasks.every_category(args.shared, seed + 30_000, args.family)
    truth = tasks.every_category(args.truth, seed + 40_000, args.family)
    rows = {}
    for a in agents:
        await engine.load_adapter(a.live, warm / a.name)
        own = a.val[:len(a.val) - args.public_val * len(CATEGORIES)]  # without the benchmark's shared part
        sets = {"own": own, "shared": shared, "truth": truth}
        ev = await learner.evaluate(engine, a.live, [e for s in sets.values() for e in s],
                                    concurrency=args.concurrency, with_loss=False)
        graded, start = {}, 0
        for name, examples in sets.items():
            graded[name] = [(e.category, bool(ok)) for e, ok in ev.results[start:start + len(examples)]]
            start += len(examples)
        rows[str(a.index)] = {**graded, "validation": a.evaluation.accuracy}
        await engine.unload_adapter(a.live)
    return rows


async def run(args: argparse.Namespace) -> list[dict]:
    seeds: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="knexa-noise-") as scratch:
        async with Engine.open(engine_config(args)) as engine:
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                seeds.append({"seed": seed, "agents": await grade_seed(engine, args, seed, Path(scratch))})
                if args.json:  # after every seed: a later failure loses only that seed
                    await trio.Path(args.json).write_text(json.dumps({"args": vars(args), "seeds": seeds}))
                print(f"seed {seed} graded", flush=True)
    return seeds


Profile = tuple[np.ndarray, float]  # per-category skills, overall accuracy


def profile(graded: Graded) -> Profile:
    by_category = {c: [ok for cc, ok in graded if cc == c] for c in CATEGORIES}
    skills = np.array([statistics.fmean(v) if v else 0.0 for v in by_category.values()])
    return skills, statistics.fmean(ok for _, ok in graded)


def first_per_category(graded: Graded, k: int) -> Graded:
    return [g for c in CATEGORIES for g in [g for g in graded if g[0] == c][:k]]


def lead(teacher: Profile, student: Profile) -> float:
    return float(np.maximum(0.0, teacher[0] - student[0]).sum())


def oriented(a: str, b: str, profiles: dict[str, Profile]) -> tuple[str, str]:
    """(teacher, student): the better validator teaches, as the daemon orients a pair."""
    return (a, b) if profiles[a][1] >= profiles[b][1] else (b, a)


ProfileSource = Callable[[dict[str, Graded]], Graded]


def sources(shared: int) -> dict[str, ProfileSource]:
    ks = sorted({k for k in (4, 8, 16, shared) if k <= shared})
    out: dict[str, ProfileSource] = {"own split only": lambda r: r["own"]}
    for k in ks:
        out[f"own + {k} shared"] = lambda r, k=k: r["own"] + first_per_category(r["shared"], k)
    out[f"{ks[-1]} shared only"] = lambda r: first_per_category(r["shared"], ks[-1])
    return out


def noise_table(seeds: list[dict], shared: int) -> None:
    print(f"{'profile built from':22s} {'skill MAE':>9s} {'orientation right':>17s} {'corr(lead, true lead)':>21s}")
    for name, source in sources(shared).items():
        mae, right, corr = [], [], []
        for s in seeds:
            rows = s["agents"]
            truth = {i: profile(r["truth"]) for i, r in rows.items()}
            seen = {i: profile(source(r)) for i, r in rows.items()}
            mae.append(statistics.fmean(float(np.abs(seen[i][0] - truth[i][0]).mean()) for i in rows))
            agree, seen_lead, true_lead = [], [], []
            for a, b in itertools.combinations(sorted(rows), 2):
                t, st = oriented(a, b, seen)
                agree.append(truth[t][1] >= truth[st][1])
                seen_lead.append(lead(seen[t], seen[st]))
                true_lead.append(lead(truth[t], truth[st]))
            right.append(statistics.fmean(agree))
            if np.std(seen_lead) > 0 and np.std(true_lead) > 0:  # undefined where every lead is equal
                corr.append(float(np.corrcoef(seen_lead, true_lead)[0, 1]))
        print(f"{name:22s} {statistics.fmean(mae):9.3f} {statistics.fmean(right):17.0%} "
              f"{statistics.fmean(corr) if corr else float('nan'):+21.2f}")


def greedy_by_lead(leads: dict[frozenset[int], float]) -> frozenset[frozenset[int]]:
    used: set[int] = set()
    chosen = []
    for pair in sorted(leads, key=lambda p: -leads[p]):
        if not pair & used:
            used |= pair
            chosen.append(pair)
    return frozenset(chosen)


def benefit_table(seeds: list[dict], pair_results: Sequence[dict], shared: int) -> None:
    by_seed = {r["seed"]: r for r in pair_results}
    common = [s for s in seeds if s["seed"] in by_seed]
    if not common:
        print("no seed in common with the pairs results")
        return
    for s in common:
        r, agents = by_seed[s["seed"]], s["agents"]
        same = ("not recorded" if any("validation" not in g for g in agents.values()) else
                all(abs(g["validation"] - r["teachers"][i]["validation"]) < 1e-9 for i, g in agents.items()))
        print(f"seed {s['seed']}: the same warm adapters as the pairs study (validation accuracies match): {same}")
    named = {**sources(shared), "truth set": lambda g: g["truth"]}
    print(f"{'profile built from':22s} {'Spearman(lead, benefit)':>23s} {'greedy-by-lead − random':>24s}")
    for name, source in named.items():
        rhos, gains = [], []
        for s in common:
            r = by_seed[s["seed"]]
            alone = {int(i): o["alone_live_test"] for i, o in r["agents"].items()}
            seen = {int(i): profile(source(g)) for i, g in s["agents"].items()}
            leads = {frozenset((p["teacher"], p["student"])): lead(seen[p["teacher"]], seen[p["student"]])
                     for p in r["pairs"]}
            benefits = [p["live_test"] - alone[p["student"]] for p in r["pairs"]]
            rhos.append(spearman([leads[frozenset((p["teacher"], p["student"]))] for p in r["pairs"]], benefits))
            values = {frozenset(m): v for m, v in matching_values(r, "live").items()}
            gains.append(values[greedy_by_lead(leads)] - statistics.fmean(values.values()))
        print(f"{name:22s} {statistics.fmean(rhos):+23.2f} {statistics.fmean(gains):+24.3f}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_arguments(parser)
    parser.add_argument("--shared", type=int, default=16, help="shared examples per category graded")
    parser.add_argument("--truth", type=int, default=30, help="examples per category of the truth set")
    parser.add_argument("--merge", nargs="+", default=None, help="report over saved results instead of running")
    parser.add_argument("--pairs", nargs="+", default=None, help="bench/distill_pairs.py results of the same seeds")
    args = with_defaults(parser.parse_args())
    args.votes = 1
    return args


def main() -> None:
    args = parse_args()
    if args.merge:
        loaded = [json.loads(Path(f).read_text()) for f in args.merge]
        seeds = [s for d in loaded for s in d["seeds"]]
        shared = min(d["args"]["shared"] for d in loaded)
    else:
        seeds, shared = trio.run(run, args), args.shared
    print(f"{len(seeds)} seed(s): {[s['seed'] for s in seeds]}; own split sizes "
          f"{[[len(g['own']) for g in s['agents'].values()] for s in seeds]}")
    noise_table(seeds, shared)
    if args.pairs:
        benefit_table(seeds, [r for f in args.pairs for r in json.loads(Path(f).read_text())["seeds"]], shared)


if __name__ == "__main__":
    main()
