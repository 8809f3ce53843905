"""Would more rounds help? The daemon's matchmaker replayed over measured pairs, for as many rounds as asked.

    python bench/distill_replay.py docs/distill/splitdrop6_seeds0-1.json docs/distill/splitdrop6_seed2.json

bench/distill_pairs.py trains every teacher/student pair of one round for real and records each pair's reward
(the student's validation-loss drop) and benefit (its test accuracy over training alone). This feeds those
rewards to the daemon's own round code (`next_plan`, `close_round`: the LinUCB prior, its z-scored rewards,
greedy pairing) round after round, with the agents' round-1 profiles held fixed, and scores each round's
matching by the measured test accuracies. A pair's reward in a replayed round is its measured drop plus
Gaussian noise (`--noise`, in units of the standard deviation of the drops across pairs: a real round trains
again and measures a different drop), averaged over `--repeats` noise draws. It shows how many rounds the
bandit needs to find the matching its reward prefers, and what that matching is worth against random pairing,
which the three-round CPU benchmark cannot separate from the noise of training. Profiles held fixed make it an
upper bound on what learning the reward can bring: in a real mesh the students change after every round.
No model runs; it takes seconds.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from distill_pairs import matching_values, pair_table

from knexa.node.learn.linucb import DEFAULT_BETA0, Candidate, RewardScaler, lead_prior, new_bandit, profile_vector
from knexa.node.learn.rounds import MatchmakerState, RewardReport, close_round, next_plan

MEASURES = ("live", "shadow")


def agent_name(index: int | str) -> str:
    return f"agent{index}"


def candidates_of(result: dict) -> list[Candidate]:
    """The agents as the matchmaker saw them in the measured round: validated skills and accuracy."""
    return [Candidate(agent_name(i), profile_vector(t["skills"], t["validation"]), t["validation"])
            for i, t in sorted(result["teachers"].items(), key=lambda item: int(item[0]))]


def initial_state(prior_weight: float, beta0: float = DEFAULT_BETA0) -> MatchmakerState:
    """The daemon's first state; with `prior_weight` > 0, its prior on the lead terms held as firmly as that
    many unit observations (an experiment: the daemon's prior weighs only lambda), and exploring with `beta0`."""
    bandit = new_bandit(beta0=beta0)
    if prior_weight > 0:
        prior = lead_prior()
        bandit.A = bandit.A + prior_weight * np.diag((prior > 0).astype(float))
        bandit.b = bandit.A @ prior
    return MatchmakerState(0, bandit, RewardScaler())


def replay(result: dict, rounds: int, noise: float, rng: random.Random,
           prior_weight: float = 0.0, beta0: float = DEFAULT_BETA0) -> list[frozenset[frozenset[int]]]:
    """The matching the daemon's round code picks in each of `rounds` rounds, fed the measured drops."""
    table = pair_table(result)
    spread = statistics.pstdev(p["loss_drop"] for p in result["pairs"])
    candidates = candidates_of(result)
    state = initial_state(prior_weight, beta0)
    chosen = []
    for _ in range(rounds):
        state = next_plan(state, candidates, "replay", 0, 1.0)
        assert state.plan is not None
        reports = {}
        matching = []
        for pair in state.plan.pairs:
            t, s = int(pair.teacher.removeprefix("agent")), int(pair.student.removeprefix("agent"))
            measured = table[frozenset((t, s))]
            drop = measured["loss_drop"] + rng.gauss(0.0, noise * spread)
            reports[pair.student] = RewardReport(state.round_no, pair.student, pair.teacher, measured["val_gain"],
                                                 0.0, measured["kept"], drop)
            matching.append(frozenset((t, s)))
        state, rejected = close_round(state, reports)
        assert not rejected, rejected
        chosen.append(frozenset(matching))
    return chosen


def seed_report(result: dict, rounds: int, noise: float, repeats: int, prior_weight: float = 0.0,
                beta0: float = DEFAULT_BETA0) -> dict:
    table = pair_table(result)
    values = {measure: {frozenset(m): v for m, v in matching_values(result, measure).items()}
              for measure in MEASURES}
    by_drop = max(values["live"], key=lambda m: sum(table[pair]["loss_drop"] for pair in m))
    runs = [replay(result, rounds, noise, random.Random(repeat), prior_weight, beta0) for repeat in range(repeats)]
    report: dict = {"seed": result["seed"], "matchings": len(values["live"])}
    for measure in MEASURES:
        v = values[measure]
        report[measure] = {
            "random": statistics.fmean(v.values()), "best": max(v.values()), "by_loss_drop": v[by_drop],
            "linucb": [statistics.fmean(v[run[r]] for run in runs) for r in range(rounds)],
        }
    report["found_by_loss_drop"] = [sum(run[r] == by_drop for run in runs) / repeats for r in range(rounds)]
    return report


def print_report(reports: Sequence[dict], rounds: int, noise: float) -> dict:
    shown = sorted({0, 1, 2, 4, 7, rounds - 1} & set(range(rounds)))
    mean: dict = {}
    for measure in MEASURES:
        rows = [r[measure] for r in reports]
        mean[measure] = {
            "random": statistics.fmean(r["random"] for r in rows),
            "best": statistics.fmean(r["best"] for r in rows),
            "by_loss_drop": statistics.fmean(r["by_loss_drop"] for r in rows),
            "linucb": [statistics.fmean(r["linucb"][i] for r in rows) for i in range(rounds)],
        }
        m = mean[measure]
        print(f"{measure:6s} (noise {noise:g}): random {m['random']:.3f}, best {m['best']:.3f} "
              f"({m['best'] - m['random']:+.3f}), by loss drop {m['by_loss_drop']:.3f} "
              f"({m['by_loss_drop'] - m['random']:+.3f}); LinUCB over random in round "
              + ", ".join(f"{i + 1}: {m['linucb'][i] - m['random']:+.3f}" for i in shown)
              + f"; rounds 1-{rounds} on average {statistics.fmean(m['linucb']) - m['random']:+.3f}")
    found = [statistics.fmean(r["found_by_loss_drop"][i] for r in reports) for i in range(rounds)]
    mean["found_by_loss_drop"] = found
    print("         share of replays whose matching is the one the measured drops prefer, round "
          + ", ".join(f"{i + 1}: {found[i]:.2f}" for i in shown))
    return mean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="JSON written by bench/distill_pairs.py --json")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.5, 1.0],
                        help="reward noise, in standard deviations of the measured drops across pairs")
    parser.add_argument("--repeats", type=int, default=50, help="noise draws per seed and noise level")
    parser.add_argument("--prior-weight", type=float, default=0.0,
                        help="hold the prior on the lead terms as firmly as this many observations (default: "
                             "the daemon's, lambda alone)")
    parser.add_argument("--beta0", type=float, default=DEFAULT_BETA0,
                        help=f"exploration width beta0 (default: the daemon's, {DEFAULT_BETA0})")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    if not args.beta0 >= 0:
        parser.error("--beta0 must be 0 or more")
    results = [seed for path in args.results for seed in json.loads(path.read_text())["seeds"]]
    missing = [r["seed"] for r in results if "teachers" not in r or not r["pairs"]]
    if missing:
        parser.error(f"seeds {missing} have no measured pairs or no profiles (run distill_pairs without "
                     "--teachers-only)")
    print(f"{len(results)} seeds ({', '.join(str(r['seed']) for r in results)}), {args.rounds} rounds, "
          f"{args.repeats} noise draws each")
    out = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "noise": {}}
    for noise in args.noise:
        reports = [seed_report(r, args.rounds, noise, args.repeats if noise else 1, args.prior_weight, args.beta0)
                   for r in results]
        out["noise"][str(noise)] = {"seeds": reports, "mean": print_report(reports, args.rounds, noise)}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
