"""Shadow training beside serving (CoLLM): what training costs the requests, and what serving costs training.

    python bench/shadow_training.py [--model embedded|PATH] [--dtype auto|float32|bfloat16] [--steps 10]
                                    [--target 0.5] [--min-share 0.05]

One engine, a rank-8 live adapter (B = 0) and its shadow, three phases:
1. serving alone: --clients clients send greedy chat requests back to back with the live adapter for
   --seconds; decode time per token (after the first) and time to first token, medians over requests;
2. training alone: --steps optimizer steps (batch 4) of the shadow on the idle engine; steps/s;
3. both at once: the same clients while the shadow trains with latency_target_s = --target and min_share =
   --min-share; the same figures as ratios to phases 1 and 2, the worker rounds in which training yielded and
   the examples it ran only through its floor share.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import trio

from knexa.node.engine import Engine, EngineConfig, GenerationRequest, SamplingParams, TrainExample, TrainSpec

PROMPTS = ["Explain how a hash table works.", "Describe the water cycle to a child.",
           "Give advice to someone learning to cook.", "How do bees communicate?"]
EXAMPLES = [
    TrainExample([{"role": "user", "content": f"What is {a} + {b}? Reply with the number only."}], str(a + b))
    for a, b in [(12, 7), (23, 19), (5, 48), (31, 30), (64, 17), (9, 9), (40, 2), (15, 26)]
]


async def serve(engine: Engine, clients: int, seconds: float, tokens: int) -> tuple[float, float, int]:
    """Median decode seconds per token, median time to first token, requests answered."""
    per_token: list[float] = []
    first: list[float] = []
    deadline = time.monotonic() + seconds

    async def client(index: int) -> None:
        while time.monotonic() < deadline:
            request = GenerationRequest(messages=[{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}],
                                        params=SamplingParams(max_new_tokens=tokens), adapter="live")
            result = await engine.generate(request)
            if result.tokens_per_s > 0:
                per_token.append(1 / result.tokens_per_s)
            first.append(result.time_to_first_token_s)

    async with trio.open_nursery() as nursery:
        for index in range(clients):
            nursery.start_soon(client, index)
    return statistics.median(per_token), statistics.median(first), len(first)


async def main(args: argparse.Namespace) -> None:
    config = EngineConfig(model=None if args.model == "embedded" else Path(args.model), dtype=args.dtype,
                          max_batch=max(args.clients, 1), show_progress=False)
    async with Engine.open(config) as engine:
        status = engine.status()
        print(f"model {status['model']['name']} on {status['device']} ({status['dtype']}), "
              f"{status['torch_threads']} torch threads, {args.clients} clients, target {args.target} s")
        await engine.ensure_adapter("live")
        spec = TrainSpec("live", "shadow", EXAMPLES, steps=args.steps, lr=1e-3, batch_size=4,
                         latency_target_s=args.target)
        await engine.train_shadow(TrainSpec("live", "shadow", EXAMPLES, steps=1))  # warm-up
        await serve(engine, args.clients, 2.0, 8)

        alone_token, alone_first, alone_requests = await serve(engine, args.clients, args.seconds, args.tokens)
        started = time.perf_counter()
        report = await engine.train_shadow(spec)
        alone_steps_s = report.steps / (time.perf_counter() - started)

        # Both: training with more steps than it can finish, stopped (cancelled) when serving ends.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(engine.train_shadow, TrainSpec(
                "live", "shadow", EXAMPLES, steps=100_000, lr=1e-3, batch_size=4, latency_target_s=args.target,
                min_share=args.min_share))
            while engine.status()["training"] is None:  # noqa: ASYNC110 - the worker does not signal it
                await trio.sleep(0.01)
            started = time.perf_counter()
            token, first, requests = await serve(engine, args.clients, args.seconds, args.tokens)
            training = engine.status()["training"]
            served_s = time.perf_counter() - started
            nursery.cancel_scope.cancel()
        steps_s = training["steps_done"] / served_s
        print(f"serving alone:  {alone_token * 1000:7.1f} ms/token, first token {alone_first:.3f} s, "
              f"{alone_requests} requests")
        print(f"training alone: {alone_steps_s:7.3f} steps/s, loss {report.first_loss:.3f} -> {report.last_loss:.3f}")
        print(f"both:           {token * 1000:7.1f} ms/token (x{token / alone_token:.2f}), first token "
              f"{first:.3f} s (x{first / alone_first:.2f}), {requests} requests")
        print(f"                training {steps_s:.3f} steps/s (x{steps_s / alone_steps_s:.2f}), "
              f"{training['yielded_rounds']} rounds yielded, {training['floor_pieces']} examples by the floor share")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--min-share", type=float, default=TrainSpec.min_share)
    trio.run(main, parser.parse_args())
