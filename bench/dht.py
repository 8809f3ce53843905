"""Provider-lookup benchmark: N in-process knexa.dht nodes on loopback.

    python bench/dht.py [--sizes 20,50,100] [--lookups 200] [--alpha 3]

For each size it starts N hosts (each bootstraps from one random earlier node,
then every node runs one routing-table refresh), lets every node announce one
content key, then, from random nodes, for keys provided by another node:

1. times `find_providers(key, limit=1)` as a caller gets it: the node's own
   store first (it holds the record whenever it is one of the k=20 replicas;
   at N <= 21 that is every node), then the network ("local%" = answered from
   the own store);
2. times the same lookup forced over the network (`use_local=False`) and
   records the hop count (depth of the referral chain to the peer that returned
   the provider: 1 = a peer from the node's own routing table) beside log2(N),
   and the number of peers queried.

All hosts share one Python process and one trio loop, so the CPU of every
"remote" peer is charged to the lookup being timed.

Hosts built by knexa.net.host never run py-libp2p's auto-connector, so the
mesh is the one the bootstrap links and the lookups themselves create.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from dht_helpers import Node, fast_config, start_node  # noqa: E402

from knexa.dht import model_key  # noqa: E402


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


async def run_size(n: int, lookups: int, alpha: int, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    cfg = fast_config(alpha=alpha, rpc_timeout=5.0, lookup_timeout=20.0)
    async with trio.open_nursery() as nursery:
        t0 = time.perf_counter()
        nodes: list[Node] = []
        for _ in range(n):
            boot = [rng.choice(nodes).addr] if nodes else []
            node = await start_node(nursery, boot, config=cfg)  # type: ignore[arg-type]
            nodes.append(node)
        limiter = trio.CapacityLimiter(4)

        async def refresh(node: Node) -> None:
            async with limiter:
                await node.d.bootstrap()

        async def announce_one(i: int, node: Node) -> None:
            async with limiter:
                await node.d.provide(model_key(f"bench-model-{i}"))

        async with trio.open_nursery() as setup_nursery:
            for node in nodes:
                setup_nursery.start_soon(refresh, node)
        setup = time.perf_counter() - t0
        t1 = time.perf_counter()
        async with trio.open_nursery() as ann_nursery:
            for i, node in enumerate(nodes):
                ann_nursery.start_soon(announce_one, i, node)
        announce = time.perf_counter() - t1
        rt = statistics.mean(nd.d.stats()["routing_table_size"] for nd in nodes)  # type: ignore[misc]

        lat: list[float] = []
        net_lat: list[float] = []
        hops: list[int] = []
        queried: list[int] = []
        local = ok = net_ok = 0
        for _ in range(lookups):
            seeker, owner = rng.sample(range(n), 2)
            d = nodes[seeker].d
            key = model_key(f"bench-model-{owner}")
            want = nodes[owner].peer_id.to_base58()
            # 1) what a caller gets: the node's own store first, then the network
            d.last_trace = None
            t = time.perf_counter()
            got = await d.find_providers(key, limit=1, timeout=20)
            lat.append(time.perf_counter() - t)
            ok += bool(got and got[0]["peer_id"] == want)
            local += d.last_trace is None
            # 2) the same lookup forced over the network: hops and peers asked
            d.last_trace = None
            t = time.perf_counter()
            got = await d.find_providers(key, limit=1, timeout=20, use_local=False)
            net_lat.append(time.perf_counter() - t)
            net_ok += bool(got and got[0]["peer_id"] == want)
            trace = d.last_trace
            hops.append(trace.hit_hops or 0 if trace else 0)
            queried.append(trace.queried if trace else 0)
        nursery.cancel_scope.cancel()
    return {
        "n": n,
        "setup_s": setup,
        "announce_s": announce,
        "rt_mean": rt,
        "success": ok / lookups,
        "net_success": net_ok / lookups,
        "p50_ms": 1000 * _pct(lat, 0.5),
        "p99_ms": 1000 * _pct(lat, 0.99),
        "net_p50_ms": 1000 * _pct(net_lat, 0.5),
        "net_p99_ms": 1000 * _pct(net_lat, 0.99),
        "local_share": local / lookups,
        "hops_mean": statistics.mean(hops),
        "hops_max": max(hops),
        "queried_mean": statistics.mean(queried),
        "log2n": math.log2(n),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="20,50,100")
    ap.add_argument("--lookups", type=int, default=200)
    ap.add_argument("--alpha", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    print(
        f"{'N':>4} {'ok%':>6} {'p50ms':>7} {'p99ms':>7} {'net ok%':>7} {'net p50':>8} {'net p99':>8} "
        f"{'local%':>7} {'hops':>5} {'max':>4} {'log2N':>6} {'asked':>6} {'rt':>5} "
        f"{'setup s':>8} {'ann s':>6}"
    )
    for n in sizes:
        r = trio.run(run_size, n, args.lookups, args.alpha, args.seed)
        print(
            f"{r['n']:>4} {100 * r['success']:>6.1f} {r['p50_ms']:>7.1f} {r['p99_ms']:>7.1f} "
            f"{100 * r['net_success']:>7.1f} "
            f"{r['net_p50_ms']:>8.1f} {r['net_p99_ms']:>8.1f} {100 * r['local_share']:>7.1f} "
            f"{r['hops_mean']:>5.2f} {r['hops_max']:>4} {r['log2n']:>6.2f} "
            f"{r['queried_mean']:>6.1f} {r['rt_mean']:>5.1f} {r['setup_s']:>8.1f} "
            f"{r['announce_s']:>6.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
