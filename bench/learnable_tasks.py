"""Which of the task family's categories SmolLM2-135M learns on its own data: per family and category, a fresh
LoRA adapter's accuracy on held-out prompts before and after a few dozen training steps on a few dozen examples.

    python bench/learnable_tasks.py                    # both families, 30 examples, 48 steps, 24 test prompts
    python bench/learnable_tasks.py --family learnable

Why it matters: a distillation student learns a teacher's answers, and a teacher is right in its own slice only
where it could learn that slice; see "Learning together" in the README.
"""

from __future__ import annotations

import argparse
import time

import trio

from knexa.node.engine import Engine, EngineConfig
from knexa.node.learn import agent as learner
from knexa.node.learn import tasks


async def main(args: argparse.Namespace) -> None:
    config = EngineConfig(max_batch=args.test, max_queue=4 * args.test, torch_threads=args.threads)
    async with Engine.open(config) as engine:
        print("family     category    before  after   (seconds)")
        for family in args.family:
            for category in tasks.CATEGORIES:
                started = time.perf_counter()
                examples = tasks.generate_examples(category, args.examples + args.test, args.seed, family)
                train, test = examples[: args.examples], examples[args.examples :]
                adapter = f"{family}-{category}"
                await engine.ensure_adapter(adapter, seed=args.seed)
                before = await learner.evaluate(engine, adapter, test, concurrency=args.test, with_loss=False)
                outcome = await learner.train_and_keep_if_better(
                    engine, adapter, learner.mixed_examples(train, [], alpha=0.0), test, steps=args.steps,
                    lr=args.lr, batch_size=4, seed=args.seed, latency_target_s=10.0, concurrency=args.test)
                print(f"{family:10s} {category:10s}  {before.accuracy:5.2f}  {outcome.after.accuracy:5.2f}   "
                      f"({time.perf_counter() - started:.0f})", flush=True)
                await engine.unload_adapter(adapter)
                await engine.unload_adapter(learner.shadow_of(adapter))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", nargs="+", default=list(tasks.FAMILIES), choices=tuple(tasks.FAMILIES))
    parser.add_argument("--examples", type=int, default=30)
    parser.add_argument("--test", type=int, default=24)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    return parser.parse_args()


if __name__ == "__main__":
    trio.run(main, parse_args())
