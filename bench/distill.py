"""Learning together: test accuracy per round for local-only training, random pairing and LinUCB pairing.

    python bench/distill.py                       # reduced CPU configuration
    python bench/distill.py --full --plot out.png # the full configuration (a CUDA GPU)

N agents, each with a Dirichlet-skewed slice of a synthetic task family with checkable answers (arithmetic,
unit conversion, string manipulation, day-of-week reasoning), each with its own LoRA adapter on the shipped
SmolLM2. All three conditions start from the same locally trained adapters, use the same seeds and give every
agent the same number of training steps a round:
- local: every agent trains on its own data only;
- random: disjoint pairs drawn at random; the student trains on (1 - alpha) own data + alpha teacher answers
  (those in categories where the teacher validated better than the student, as the daemon does), teachers and
  unpaired agents train on their own data;
- linucb: pairs chosen by the LinUCB matchmaker (knexa.node.learn.rounds), rewarded with the students'
  z-scored drops in validation loss (as the daemon's students report them).
Every agent validates on its own split plus a validation set of every category that all agents share
(`--public-val`, as the daemon's `learn_public_validation`). A shadow adapter replaces the live one only if it
validates better. The agents share one engine in this
process (one adapter pair each); the same steps over the real mesh are tested in tests/test_learn_mesh.py.
Accuracy is measured on a held-out test set of all categories, the mean over agents.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from knexa.node.engine import Engine, EngineConfig
from knexa.node.learn import agent as learner
from knexa.node.learn import tasks
from knexa.node.learn.linucb import Candidate, node_dim, profile_vector, random_pairs
from knexa.node.learn.rounds import (
    REWARD_SIGNALS,
    MatchmakerState,
    RewardReport,
    alpha_for,
    close_round,
    next_plan,
)
from knexa.node.learn.settings import LearnSettings

CONDITIONS = ("local", "random", "linucb")
REDUCED = dict(agents=4, rounds=4, per_category=80, test_per_category=12, transfer=32, teacher_tokens=24,
               steps=24, warmup_steps=48, seeds=1, concurrency=16, max_batch=16)
FULL = dict(agents=6, rounds=8, per_category=120, test_per_category=25, transfer=32, teacher_tokens=256,
            steps=30, warmup_steps=60, seeds=2, concurrency=48, max_batch=48)


@dataclass
class Agent:
    index: int
    train: list[tasks.Example]
    val: list[tasks.Example]
    live: str = ""
    evaluation: learner.Evaluation | None = None
    history: list[float] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"agent{self.index}"

    def candidate(self) -> Candidate:
        ev = self.evaluation
        assert ev is not None
        return Candidate(self.name, profile_vector(ev.skills, ev.accuracy), ev.accuracy)


def make_agents(args: argparse.Namespace, seed: int) -> tuple[list[Agent], list[tasks.Example]]:
    shards = tasks.dirichlet_slices(args.agents, args.per_category, args.dirichlet, seed, args.family)
    # As the daemon does (learn_public_validation), but drawn anew for each benchmark seed.
    public = tasks.public_validation(args.public_val, seed + 20_000, args.family)
    agents = []
    for i, shard in enumerate(shards):
        train, val = tasks.split_train_val(shard, 0.25, seed=seed + i)
        agents.append(Agent(i, train, val + public))
    test = [e for c in tasks.CATEGORIES
            for e in tasks.generate_examples(c, args.test_per_category, seed + 10_000, args.family)]
    return agents, test


def own_examples(a: Agent) -> list:
    return learner.mixed_examples(a.train, [], alpha=0.0)


async def train(engine: Engine, a: Agent, examples: list, steps: int, args: argparse.Namespace, seed: int
                ) -> learner.TrainOutcome:
    outcome = await learner.train_and_keep_if_better(
        engine, a.live, examples, a.val, steps=steps, before=a.evaluation, lr=args.lr, batch_size=args.batch_size,
        seed=seed, latency_target_s=10.0, concurrency=args.concurrency,
    )
    a.evaluation = outcome.live
    return outcome


async def run_condition(engine: Engine, condition: str, agents: list[Agent], test: list[tasks.Example],
                        warm: Path, args: argparse.Namespace, seed: int) -> list[float]:
    for a in agents:
        a.live = f"{condition}{a.index}"
        await engine.load_adapter(a.live, warm / a.name)
        a.evaluation = await learner.evaluate(engine, a.live, a.val, concurrency=args.concurrency)

    async def test_accuracy() -> float:
        scores = [(await learner.evaluate(engine, a.live, test, concurrency=args.concurrency,
                                          with_loss=False)).accuracy for a in agents]
        return statistics.fmean(scores)

    curve = [await test_accuracy()]
    state, rng = MatchmakerState.initial(), random.Random(seed)
    for round_no in range(1, args.rounds + 1):
        started = time.perf_counter()
        candidates = [a.candidate() for a in agents]
        if condition == "linucb":
            state = next_plan(state, candidates, "bench", now_ms=round_no, round_deadline_s=1e6)
            pairs = list(state.plan.pairs)
        elif condition == "random":
            pairs = random_pairs(candidates, rng)
        else:
            pairs = []
        by_name = {a.name: a for a in agents}
        students = {p.student: p for p in pairs}
        rewards: dict[str, RewardReport] = {}
        prompts = tasks.transfer_set(args.transfer, seed * 1000 + round_no, args.family)
        for a in agents:
            pair = students.get(a.name)
            if pair is None:
                examples = own_examples(a)
            else:
                teacher = by_name[pair.teacher]
                answers = await learner.teacher_answers(engine, teacher.live, prompts, args.teacher_tokens,
                                                        seed=seed * 7919 + round_no, concurrency=args.concurrency,
                                                        votes=args.votes)
                useful = tasks.answers_worth_learning(zip(prompts, answers, strict=True),
                                                      teacher.evaluation.skills, a.evaluation.skills)
                examples = learner.mixed_examples(a.train, useful, alpha_for(round_no))
            outcome = await train(engine, a, examples, args.steps, args, seed + round_no)
            if pair is not None:
                rewards[a.name] = RewardReport(round_no, a.name, pair.teacher, outcome.gain,
                                               outcome.accuracy_after, outcome.swapped, outcome.loss_drop)
        if condition == "linucb":
            state, rejected = close_round(state, rewards, signal=args.reward)
            assert not rejected, rejected
        curve.append(await test_accuracy())
        # Per pair: the teacher's summed per-category lead over its student (what the matchmaker's prior
        # credits), then the student's validation gain, loss drop and whether it kept the shadow.
        pairs_text = ", ".join(
            f"{p.teacher}->{p.student} (lead {sum(p.context[2 * node_dim():]):.2f}, "
            f"gain {rewards[p.student].gain:+.3f}, loss drop {rewards[p.student].loss_drop:+.4f}"
            f"{', kept' if rewards[p.student].swapped else ''})"
            for p in pairs) or "-"
        print(f"  {condition:6s} round {round_no}: test accuracy {curve[-1]:.3f}  pairs {pairs_text}  "
              f"({time.perf_counter() - started:.0f}s)", flush=True)
    for a in agents:
        await engine.unload_adapter(a.live)
        await engine.unload_adapter(learner.shadow_of(a.live))
    return curve


async def warm_up(engine: Engine, agents: list[Agent], args: argparse.Namespace, seed: int, warm: Path) -> None:
    """Every agent trains on its own data from a fresh adapter; the adapters are saved under warm/."""
    for a in agents:
        a.live = f"warm{a.index}"
        await engine.ensure_adapter(a.live, seed=seed + a.index)
        a.evaluation = await learner.evaluate(engine, a.live, a.val, concurrency=args.concurrency)
        await train(engine, a, own_examples(a), args.warmup_steps, args, seed)
        await engine.save_adapter(a.live, warm / a.name)
        await engine.unload_adapter(a.live)
        await engine.unload_adapter(learner.shadow_of(a.live))


async def run_seed(engine: Engine, args: argparse.Namespace, seed: int, scratch: Path) -> dict[str, list[float]]:
    agents, test = make_agents(args, seed)
    warm = scratch / f"warm-{seed}"
    print(f"seed {seed}: {len(agents)} agents, train sizes {[len(a.train) for a in agents]}, "
          f"test {len(test)}; local warm-up {args.warmup_steps} steps", flush=True)
    await warm_up(engine, agents, args, seed, warm)
    return {c: await run_condition(engine, c, agents, test, warm, args, seed) for c in args.conditions}


async def main(args: argparse.Namespace) -> dict[str, list[list[float]]]:
    config = engine_config(args)
    started = time.perf_counter()
    curves: dict[str, list[list[float]]] = {c: [] for c in args.conditions}
    with tempfile.TemporaryDirectory(prefix="knexa-distill-") as scratch:
        async with Engine.open(config) as engine:
            status = engine.status()
            print(f"model {status['model']['name']} on {status['device']} ({status['dtype']})", flush=True)
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                for condition, curve in (await run_seed(engine, args, seed, Path(scratch))).items():
                    curves[condition].append(curve)
    report(curves)
    print(f"total {time.perf_counter() - started:.0f}s")
    return curves


def mean_curves(curves: dict[str, list[list[float]]]) -> dict[str, list[float]]:
    return {c: [statistics.fmean(vals) for vals in zip(*runs, strict=True)] for c, runs in curves.items()}


def report(curves: dict[str, list[list[float]]]) -> None:
    mean = mean_curves(curves)
    runs = len(next(iter(curves.values())))
    print(f"\nmean test accuracy over agents and {runs} run(s), per round (round 0 = after local warm-up):")
    print("round  " + "  ".join(f"{c:>7s}" for c in mean))
    for r in range(len(next(iter(mean.values())))):
        print(f"{r:5d}  " + "  ".join(f"{mean[c][r]:7.3f}" for c in mean))
    base = mean.get("local", [0.0])[-1]
    for c, values in mean.items():
        ratio = values[-1] / base if base else float("nan")
        print(f"{c:6s}: final {values[-1]:.3f}, gain over warm-up {values[-1] - values[0]:+.3f}, "
              f"final / local-only {ratio:.2f}")
    for better, worse in (("linucb", "random"), ("random", "local"), ("linucb", "local")):
        if better in curves and worse in curves and runs > 1:
            for label, diffs in paired_differences(curves[better], curves[worse]).items():
                print(f"{better} - {worse}, {label}: {describe_differences(diffs)}")


def paired_differences(better: list[list[float]], worse: list[list[float]]) -> dict[str, list[float]]:
    """Per seed, one condition's accuracy minus another's: after the last round, and averaged over the
    rounds after warm-up (how much better it was along the way, not only at the end)."""
    pairs = list(zip(better, worse, strict=True))
    return {
        "final": [b[-1] - w[-1] for b, w in pairs],
        "mean of rounds 1..R": [statistics.fmean(b[1:]) - statistics.fmean(w[1:]) for b, w in pairs],
    }


def describe_differences(diffs: list[float]) -> str:
    """Mean, its standard error and the sign count: a margin is clear when the mean is several standard
    errors from zero and the seeds agree."""
    mean = statistics.fmean(diffs)
    sem = statistics.stdev(diffs) / len(diffs) ** 0.5
    wins, losses = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    per_seed = " ".join(f"{d:+.3f}" for d in diffs)
    ratio = f"{mean / sem:.1f} of them" if sem > 1e-9 else "the same in every seed"
    return f"{mean:+.3f} ± {sem:.3f} (standard error; {ratio}), " \
        f"ahead in {wins} seed(s), behind in {losses} [{per_seed}]"


def merge(paths: list[str]) -> dict[str, list[list[float]]]:
    """The curves of earlier runs (their --json files), for one mean over all their seeds. A condition run
    again for a seed (a later file, say after a change to LinUCB alone) replaces the earlier curve."""
    by_seed: dict[str, dict[int, list[float]]] = {}
    for path in paths:
        saved = json.loads(Path(path).read_text())
        for condition, runs in saved["curves"].items():
            for i, curve in enumerate(runs):
                seed = saved["args"]["first_seed"] + i
                if seed in by_seed.get(condition, {}):
                    print(f"{condition} seed {seed}: the curve of {path} replaces the earlier one")
                by_seed.setdefault(condition, {})[seed] = curve
    seeds = {condition: sorted(runs) for condition, runs in by_seed.items()}
    first = next(iter(seeds.values()))
    if any(s != first for s in seeds.values()):
        raise SystemExit(f"the files do not cover the same seeds in every condition: {seeds}")
    return {condition: [runs[seed] for seed in first] for condition, runs in by_seed.items()}


def write_outputs(curves: dict[str, list[list[float]]], args: argparse.Namespace) -> None:
    mean = mean_curves(curves)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "curves": curves, "mean": mean}, indent=1))
    if args.plot:
        plot(mean, args)


def plot(mean: dict[str, list[float]], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for condition, values in mean.items():
        ax.plot(range(len(values)), values, marker="o", label=condition)
    # From zero: a difference of one or two test answers must not look like a trend.
    ax.set_ylim(0, max(1e-3, max(max(v) for v in mean.values())) * 1.5)
    ax.set_xticks(range(len(next(iter(mean.values())))))
    ax.set_xlabel("round (0 = after local warm-up)")
    ax.set_ylabel("mean test accuracy")
    ax.set_title(f"SmolLM2-135M, {args.family} tasks, {args.agents} agents, {args.seeds} seed(s)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    print(f"plot written to {args.plot}")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(model=None if args.model == "embedded" else Path(args.model), device=args.device,
                        max_batch=args.max_batch, max_queue=4 * args.max_batch, show_progress=True,
                        torch_threads=args.threads)


def common_arguments(parser: argparse.ArgumentParser) -> None:
    """The population, model and training arguments, shared with bench/distill_pairs.py."""
    parser.add_argument("--full", action="store_true", help="the full configuration (meant for a CUDA GPU)")
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dirichlet", type=float, default=0.5)
    parser.add_argument("--family", default=tasks.DEFAULT_FAMILY, choices=tuple(tasks.FAMILIES),
                        help="the task family: 'hard' has tasks SmolLM2-135M does not learn at this budget "
                             "(two-number sums, word reversal, day offsets), 'learnable' only tasks it does")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--public-val", type=int, default=LearnSettings.public_validation,
                        help="shared validation examples per category added to every agent's own (default "
                        f"{LearnSettings.public_validation}, as the daemon's learn_public_validation)")
    parser.add_argument("--first-seed", type=int, default=0, help="run seeds first-seed .. first-seed + seeds - 1")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: the engine's, all cores but one)")
    for name, value in REDUCED.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help=f"reduced: {value}, "
                            f"full: {FULL[name]}")
    parser.add_argument("--json", default=None)


def with_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Sizes not given on the command line come from the reduced or the full configuration."""
    for name, value in (FULL if args.full else REDUCED).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_arguments(parser)
    parser.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=CONDITIONS)
    parser.add_argument("--reward", default="loss_drop", choices=REWARD_SIGNALS,
                        help="what the matchmaker learns from (the daemon's: loss_drop); it changes only the "
                             "LinUCB condition: run --conditions linucb and merge with the same seeds' other runs")
    parser.add_argument("--votes", type=int, default=LearnSettings.teacher_votes,
                        help="samples of each teacher answer; above 1 a teacher sends only the answers most samples "
                             f"agree on (default {LearnSettings.teacher_votes}, the daemon's learn_teacher_votes); "
                             "it changes only the paired conditions")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="run nothing: average the curves of earlier runs' --json files (and --plot them)")
    parser.add_argument("--plot", default=None)
    return with_defaults(parser.parse_args())


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.merge:
        merged = merge(arguments.merge)
        arguments.seeds = len(next(iter(merged.values())))
        report(merged)
        write_outputs(merged, arguments)
    else:
        write_outputs(trio.run(main, arguments), arguments)
