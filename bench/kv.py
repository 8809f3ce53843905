"""Prefix-cache sharing: time to first token for a prompt whose long shared context (default 1,000 tokens) a
peer has already prefilled, three ways, on two real daemons in this process over loopback (signed RPC):

- local: this node prefills the whole prompt itself (the baseline);
- prefix fetch: it finds the peer's announced prefix on the DHT, streams that KV cache over RPC, checks it,
  and prefills only the question after it;
- re-send the text: it sends the whole prompt text to the peer, which prefills it and answers
  (`engine.generate` over RPC; the text path between nodes of the same model).

    python bench/kv.py [--model embedded|PATH] [--context-tokens 1000] [--repeats 3]

Each figure is the median of --repeats runs; the three ways alternate within each round so that other load on
the machine hits them alike. First token = one new token, greedy; the fetch path's tokens are checked equal to
the local path's.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import trio
from libp2p.peer.id import ID as PeerID

from knexa.node.config import NodeConfig, default_data_dir
from knexa.node.daemon import Daemon
from knexa.node.engine import GenerationRequest, SamplingParams
from knexa.node.inference_wire import GenerateCall, GenerateParams, remote_generate
from knexa.node.kvshare.prefix import PrefixStore

PARAGRAPH = (
    "Edge devices cooperate over a peer-to-peer mesh. Each node runs a small language model, shares what it "
    "can do, and passes work to peers that have spare capacity. Caches of attention keys and values can move "
    "between nodes so that a peer can continue a prompt without computing it again. "
)


async def start(nursery: trio.Nursery, data_dir: Path, model: str, cache_dir: Path, bootstrap: list[str]) -> Daemon:
    config = NodeConfig(
        data_dir=data_dir, listen=["/ip4/127.0.0.1/tcp/0"], bootstrap=bootstrap, api_port=0, model=model,
        cache_dir=cache_dir,
    ).validate()
    daemon = Daemon(config)
    await nursery.start(daemon.run)
    with trio.fail_after(600):
        while daemon.inference.status()["state"] != "ready":  # noqa: ASYNC110 - the engine starts after run()
            await trio.sleep(0.1)
    return daemon


def context_ids(daemon: Daemon, tokens: int) -> list[int]:
    tokenizer = daemon.kvshare.require_engine().tokenizer()
    ids = tokenizer(PARAGRAPH * (tokens // 40 + 2), add_special_tokens=True)["input_ids"]
    return list(ids[:tokens])


async def main(args: argparse.Namespace) -> None:
    cache_dir = args.cache_dir or default_data_dir()
    one = SamplingParams(max_new_tokens=1)
    with tempfile.TemporaryDirectory(prefix="knexa-bench-kv-") as tmp:
        async with trio.open_nursery() as nursery:
            a = await start(nursery, Path(tmp) / "a", args.model, cache_dir, [])
            b = await start(nursery, Path(tmp) / "b", args.model, cache_dir, [str(a.host.get_addrs()[0])])
            # The peer has answered a question about the shared context: it holds and announces the cache.
            context = context_ids(a, args.context_tokens)
            tokenizer = b.kvshare.require_engine().tokenizer()
            question = list(tokenizer(" Question: what moves between nodes? Answer:", add_special_tokens=False)[
                "input_ids"])
            await a.kvshare.prefill(context + list(tokenizer(" Question: what do nodes run?",
                                                             add_special_tokens=False)["input_ids"]))
            prompt = context + question
            with trio.fail_after(60):
                while not (await b.kvshare.find_longest(b.kvshare.model_id(), prompt))[1]:  # noqa: ASYNC110
                    await trio.sleep(0.2)
            b.kvshare.settings = dataclasses.replace(b.kvshare.settings, fetch="always")
            engine = b.kvshare.require_engine()
            dtype = engine.status()["dtype"]
            text = tokenizer.decode(prompt, skip_special_tokens=False)
            local, fetched, resent, details = [], [], [], []
            for _ in range(args.repeats):
                started = time.perf_counter()
                plain = await engine.generate(GenerationRequest(prompt_token_ids=prompt, params=one))
                local.append(time.perf_counter() - started)

                b.kvshare.store = PrefixStore(b.kvshare.settings.store_bytes, b.kvshare.settings.block)  # no own hit
                started = time.perf_counter()
                result, outcome = await b.kvshare.generate(prompt, one)
                fetched.append(time.perf_counter() - started)
                assert outcome.path == "prefix-hit", outcome.summary()
                assert result.token_ids == plain.token_ids
                details.append(outcome)

                started = time.perf_counter()
                call = GenerateCall(prompt=text, params=GenerateParams(max_new_tokens=1))
                async with remote_generate(b.rpc, PeerID.from_base58(a.peer_id), call) as items:
                    async for item in items:
                        if "delta" in item or "result" in item:
                            break
                resent.append(time.perf_counter() - started)
            nursery.cancel_scope.cancel()
    base = statistics.median(local)
    last = details[-1]
    print(f"model {args.model}, {dtype}; prompt {len(prompt)} tokens "
          f"({len(context)} shared context + {len(question)} question); medians of {args.repeats} runs")
    for name, values in (("local prefill", local), ("fetch prefix cache from peer", fetched),
                         ("re-send the text to the peer", resent)):
        median = statistics.median(values)
        print(f"  {name:30s} TTFT {median:.3f} s  ({median / base:.2f}x local)  runs {[round(v, 3) for v in values]}")
    print(f"  fetch path: {last.prefix_tokens} tokens fetched ({last.fetched_bytes / 2**20:.1f} MiB) in "
          f"{statistics.median(o.fetch_s for o in details):.3f} s, {last.computed_tokens} computed in "
          f"{statistics.median(o.compute_s for o in details):.3f} s")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded", help="embedded (the shipped SmolLM2) or a model folder")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where the converted model is cached")
    parser.add_argument("--context-tokens", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    return parser.parse_args()


if __name__ == "__main__":
    trio.run(main, parse_args())
