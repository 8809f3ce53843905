"""Collaboration benchmarks on real daemons in one process, over loopback.

    python bench/collab.py queue    [--seconds 15]     # queue and latency vs offered load (tiny random model)
    python bench/collab.py quality  [--prompts 20]     # single vs MoA vs weighted vote, shipped SmolLM2
    python bench/collab.py verify   [--tokens 256]     # verification cost vs generation, shipped SmolLM2

queue: one worker node runs collab.propose jobs one at a time; a second node offers Poisson arrivals at
rho = alpha * lambda = 0.5, 0.8, 0.95, 1.1 (alpha measured first), with admission off (what the queue does
by itself) and on (bound 0.8). The theoretical mean number in an M/M/1 system, rho / (1 - rho), and the brief's
simulated figures stand beside the measurements.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import trio
from libp2p.peer.id import ID as PeerID
from rich.console import Console
from rich.table import Table

from knexa.net.rpc import ErrorCode, RpcError
from knexa.node.collab.vote import final_answer
from knexa.node.collab.wire import METHOD_PROPOSE, ProposeCall, ProposeReply
from knexa.node.config import NodeConfig
from knexa.node.daemon import Daemon
from knexa.node.inference_wire import GenerateParams, Message

console = Console(width=200)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the tests' tiny-model builder
SIMULATED = {0.5: 1.0, 0.8: 3.5, 0.95: 17.0, 1.1: 504.0}  # the brief's simulated mean jobs per node


def node(base: Path, name: str, bootstrap: list[str], model: str, cache_dir: Path | None = None):
    """A daemon on loopback in this process (the tests' helper)."""
    from tests.conftest import running_daemon

    return running_daemon(base / name, bootstrap, model=model, cache_dir=cache_dir or base / "cache")


def addr(daemon: Daemon) -> str:
    return str(daemon.host.get_addrs()[0])


async def until(predicate, timeout_s: float = 120.0) -> None:
    with trio.fail_after(timeout_s):
        while not predicate():  # noqa: ASYNC110 - polling daemon state that has no event to wait on
            await trio.sleep(0.1)


def ready(daemon: Daemon) -> bool:
    return daemon.inference is not None and daemon.inference.status().get("state") == "ready"


async def mesh(stack: AsyncExitStack, base: Path, models: list[str], cache_dir: Path | None = None) -> list[Daemon]:
    daemons: list[Daemon] = []
    for i, model in enumerate(models):
        d = await stack.enter_async_context(node(base, f"n{i}", [addr(d) for d in daemons], model, cache_dir))
        daemons.append(d)
        # One load at a time: two SmolLM2 loads at once in one process fail in transformers ("meta tensor").
        if d.inference is not None:
            await until(lambda d=d: d.inference.status().get("state") in ("ready", "down"), 600)
            if not ready(d):
                raise SystemExit(f"engine down: {d.inference.status().get('reason')}")
    for d in daemons:
        others = [o.peer_id for o in daemons if o is not d and o.inference is not None]
        await until(lambda d=d, others=others: all(
            (p := d.ledger.profiles().get(o)) is not None and p.models for o in others), 60)
    return daemons


# -- queue length and latency vs offered load ----------------------------------------------------------
async def offer(client: Daemon, worker: Daemon, rate: float, seconds: float, tokens: int, rng: random.Random,
                ) -> dict[str, Any]:
    call = ProposeCall(round_id="bench", layer=0, messages=[Message(role="user", content="hello there")],
                       params=GenerateParams(max_new_tokens=tokens))
    latencies: list[float] = []
    samples: list[int] = []
    rejected = 0
    admission = worker.collab.admission

    async def one() -> None:
        nonlocal rejected
        start = trio.current_time()
        try:
            await client.rpc.call(PeerID.from_base58(worker.peer_id), METHOD_PROPOSE, call, timeout=600,
                                  response_model=ProposeReply)
            latencies.append(trio.current_time() - start)
        except RpcError as exc:
            if exc.code != ErrorCode.OVERLOADED:
                raise
            rejected += 1

    async def sample() -> None:
        while True:
            samples.append(admission.queue_length)
            await trio.sleep(0.01)

    sent = 0
    async with trio.open_nursery() as outer:
        outer.start_soon(sample)
        async with trio.open_nursery() as calls:
            end = trio.current_time() + seconds
            while trio.current_time() < end:
                calls.start_soon(one)
                sent += 1
                await trio.sleep(rng.expovariate(rate))
            offered_until = trio.current_time()
            queue_at_end = admission.queue_length
        outer.cancel_scope.cancel()
    return {
        "node_alpha": admission.alpha_s, "sent": sent, "rejected": rejected,
        "queue_mean": statistics.fmean(samples) if samples else 0,
        "queue_max": max(samples, default=0), "queue_at_end": queue_at_end,
        "p50": statistics.median(latencies) if latencies else math.nan,
        "p95": sorted(latencies)[int(0.95 * (len(latencies) - 1))] if latencies else math.nan,
        "seconds": offered_until,
    }


async def bench_queue(args: argparse.Namespace) -> None:
    from tests.engine_helpers import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        model = str(build_tiny_model(base / "tiny", max_positions=1024))
        async with node(base, "worker", [], model) as worker, node(base, "client", [addr(worker)], "none") as client:
            await until(lambda: ready(worker))
            admission = worker.collab.admission
            admission.enabled = False
            # alpha: sequential jobs, as the node itself measures it.
            for _ in range(3):
                await offer(client, worker, 1000.0, 0.001, args.tokens, random.Random(0))
            samples = []
            for _ in range(20):
                result = await offer(client, worker, 1000.0, 0.001, args.tokens, random.Random(0))
                samples.append(result["p50"])
            alpha = statistics.median(samples)
            console.print(f"tiny model, {args.tokens} tokens per job: service time alpha = {alpha * 1000:.1f} ms "
                          f"(capacity {1 / alpha:.1f} jobs/s); {args.seconds:.0f} s of Poisson arrivals per point")
            table = Table("rho", "admission", "offered/s", "mean queue", "max queue", "queue at end",
                          "M/M/1 rho/(1-rho)", "brief (sim.)", "rejected", "p50 latency", "p95 latency",
                          "node's alpha after")
            for enabled in (False, True):
                for rho in (0.5, 0.8, 0.95, 1.1):
                    admission.enabled = enabled
                    await until(lambda: admission.queue_length == 0, 600)
                    r = await offer(client, worker, rho / alpha, args.seconds, args.tokens, random.Random(1))
                    theory = f"{rho / (1 - rho):.1f}" if rho < 1 else "unbounded"
                    table.add_row(
                        f"{rho}", "on (0.8)" if enabled else "off", f"{rho / alpha:.1f}", f"{r['queue_mean']:.1f}",
                        str(r["queue_max"]), str(r["queue_at_end"]), theory, f"{SIMULATED[rho]:g}",
                        f"{r['rejected']}/{r['sent']}", f"{r['p50'] * 1000:.0f} ms", f"{r['p95'] * 1000:.0f} ms",
                        f"{r['node_alpha'] * 1000:.0f} ms",
                    )
            console.print(table)
            console.print(f"stability bound: alpha*lambda < 1 (alpha*((K+1)*M+1)*lambda for MoA); admission "
                          f"bound {admission.bound}, queue cap {admission.max_queue}")


# -- answer quality: single vs MoA vs weighted vote -------------------------------------------------
def arithmetic(n: int, seed: int = 7) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        op = rng.choice("+-")
        answer = a + b if op == "+" else a - b
        out.append((f"What is {a} {op} {b}? Answer with just the number.", str(answer)))
    return out


async def bench_quality(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        async with AsyncExitStack() as stack:
            origin, *_peers = await mesh(stack, base, ["embedded"] * 3, args.cache_dir or NodeConfig().cache_dir)
            # Quality, not admission: one origin asking back to back would be degraded by the origin's rule,
            # which assumes every node originates prompts at its own rate.
            origin.collab.admission.enabled = False
            for d in (origin, *_peers):
                d.collab.settings.skills = {"math": 1.0}
                d.collab.settings.verify = type(d.collab.settings.verify)(fraction=0.0)  # measure answers only
            tasks = arithmetic(args.prompts)
            modes = [
                ("single (greedy)", 0.0, None), ("single (T=0.7)", 0.7, None),
                ("MoA K=2 M=1 (T=0.7)", 0.7, ("moa", 2, 1)), ("MoA K=2 M=2 (T=0.7)", 0.7, ("moa", 2, 2)),
                ("weighted vote, 3 nodes (T=0.7)", 0.7, ("vote", 3, 0)),
            ]
            table = Table("mode", "accuracy", "mean latency", "vs single greedy")
            baseline = None
            for label, temperature, collab in modes:
                correct, times = 0, []
                for question, answer in tasks:
                    messages = [{"role": "user", "content": question}]
                    params = GenerateParams(max_new_tokens=args.tokens, temperature=temperature,
                                            top_p=0.9 if temperature else 1.0)
                    start = time.perf_counter()
                    if collab is None:
                        text = (await origin.collab.run_job(messages, params, force=True)).text
                    elif collab[0] == "moa":
                        text = (await origin.collab.ask_moa(messages, collab[1], collab[2], params, 300))["text"]
                    else:
                        text = (await origin.collab.ask_vote(messages, {"math": 1.0}, collab[1], params, 300))["text"]
                    times.append(time.perf_counter() - start)
                    correct += final_answer(text) == answer
                mean = statistics.fmean(times)
                baseline = baseline or mean
                table.add_row(label, f"{correct}/{len(tasks)} ({100 * correct / len(tasks):.0f}%)",
                              f"{mean:.2f} s", f"{mean / baseline:.2f}x")
                console.print(f"done: {label}")
            console.print(f"SmolLM2-135M-Instruct on 3 nodes in one process, {len(tasks)} arithmetic prompts "
                          f"(a +/- b, 2..40), up to {args.tokens} tokens; an answer counts when its last number "
                          "is right")
            console.print(table)


# -- verification cost ---------------------------------------------------------------------------------
async def bench_verify(args: argparse.Namespace) -> None:
    from knexa.node.collab.verify import VerifyPolicy

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        async with AsyncExitStack() as stack:
            verifier, peer = await mesh(stack, base, ["embedded"] * 2, NodeConfig().cache_dir)
            verifier.collab.settings.verify = VerifyPolicy(fraction=0.0)  # checks run explicitly below
            prompts = ["Write a long story about a lighthouse keeper and the sea.",
                       "Explain in detail how a hash table works, with examples.",
                       "Describe the history of the printing press at length."]
            table = Table("prompt", "tokens", "generation (peer)", "verification (score pass)", "cost", "verdict")
            ratios = []
            for i, prompt in enumerate(prompts[: args.repeats]):
                messages = [{"role": "user", "content": prompt}]
                params = GenerateParams(max_new_tokens=args.tokens)
                start = time.perf_counter()
                reply = await verifier.collab.ask_peer(peer.peer_id, "bench", 0, messages, params, 600)
                generation = time.perf_counter() - start
                start = time.perf_counter()
                verdict = await verifier.collab.verify_answer(peer.peer_id, messages, params, reply)
                check = time.perf_counter() - start
                ratios.append(check / reply.service_time_s)
                table.add_row(str(i), str(len(reply.token_ids)), f"{reply.service_time_s:.2f} s "
                              f"(round trip {generation:.2f} s)", f"{check:.3f} s",
                              f"{100 * check / reply.service_time_s:.1f}%", "pass" if verdict and verdict.passed
                              else f"FAIL {verdict.reason if verdict else 'not run'}")
            console.print(table)
            console.print(f"verification costs {100 * statistics.fmean(ratios):.1f}% of the generation time "
                          f"(mean of {len(ratios)}), SmolLM2-135M on CPU")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["queue", "quality", "verify"])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache-dir", type=Path, default=None, help="converted models (default: the user's)")
    args = parser.parse_args()
    if args.tokens is None:
        args.tokens = {"queue": 32, "quality": 24, "verify": 256}[args.what]
    run = {"queue": bench_queue, "quality": bench_quality, "verify": bench_verify}[args.what]
    trio.run(run, args)


if __name__ == "__main__":
    main()
