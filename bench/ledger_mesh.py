"""Ledger convergence over real daemons on loopback, all in this process.

    python bench/ledger_mesh.py [--sizes 10,30,50] [--links 3]

N daemons (host, GossipSub, signed RPC, ledger, DHT, local API; no model) join
a mesh where each dials `--links` random earlier nodes (hosts never run
py-libp2p's auto-connector, see knexa.net.host). Once every node holds every profile,
one node writes a report; the benchmark times until every node holds it, and
prints it beside the target (2 s at 50 nodes).
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import trio

from knexa.node.config import NodeConfig
from knexa.node.daemon import Daemon
from knexa.node.logs import setup_logging


async def start_node(nursery: trio.Nursery, data_dir: Path, bootstrap: list[str]) -> Daemon:
    config = NodeConfig(
        data_dir=data_dir, listen=["/ip4/127.0.0.1/tcp/0"], bootstrap=bootstrap, api_port=0, ping_interval_s=10,
        model="none",
    ).validate()
    daemon = Daemon(config)
    await nursery.start(daemon.run)
    return daemon


async def wait_until(predicate, timeout_s: float, progress=None) -> float:
    started = time.perf_counter()
    next_report = started + 10
    with trio.fail_after(timeout_s):
        # The ledgers have no change event to wait on; 5 ms polling bounds the error.
        while not predicate():  # noqa: ASYNC110
            await trio.sleep(0.005)
            if progress is not None and time.perf_counter() >= next_report:
                print(f"    after {time.perf_counter() - started:5.1f}s: {progress()}", flush=True)
                next_report += 10
    return time.perf_counter() - started


def profile_spread(nodes: list[Daemon]) -> str:
    held = sorted(len(n.ledger.profiles()) for n in nodes)
    links = sorted(len(n.host.get_connected_peers()) for n in nodes)
    return (f"profiles held min {held[0]} median {held[len(held) // 2]} of {len(nodes)}; "
            f"connections min {links[0]} median {links[len(links) // 2]}")


async def run_size(size: int, links: int, rng: random.Random) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        async with trio.open_nursery() as nursery:
            nodes: list[Daemon] = []
            started = time.perf_counter()
            for i in range(size):
                earlier = rng.sample(nodes, min(links, len(nodes)))
                bootstrap = [str(n.host.get_addrs()[0]) for n in earlier]
                nodes.append(await start_node(nursery, Path(tmp) / f"n{i}", bootstrap))
            ids = {n.peer_id for n in nodes}
            formed = await wait_until(
                lambda: all(set(n.ledger.profiles()) == ids for n in nodes), 300, lambda: profile_spread(nodes)
            )
            print(f"  {size:3d} nodes: started in {time.perf_counter() - started - formed:5.1f}s, "
                  f"all profiles everywhere after {formed:5.1f}s more", flush=True)
            await trio.sleep(2)  # let GossipSub heartbeats settle the mesh
            writer, subject = nodes[0], nodes[-1].peer_id
            entry = writer.ledger.put_report(subject, 0.75, "benchmark")
            writer.ledger_service.announce([entry])
            seconds = await wait_until(
                lambda: all(entry.key in {e.key for e in n.ledger.entries()} for n in nodes), 60
            )
            target = "met" if seconds <= 2 else "NOT met"
            print(f"  {size:3d} nodes: one write reached every node in {seconds * 1000:7.1f} ms "
                  f"(target 2 s at 50 nodes: {target})", flush=True)
            nursery.cancel_scope.cancel()


async def main(sizes: list[int], links: int, seed: int) -> None:
    setup_logging("warning")
    print(f"ledger convergence over real daemons on loopback (each dials {links} earlier nodes)")
    for size in sizes:
        await run_size(size, links, random.Random(seed))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,30,50")
    parser.add_argument("--links", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    trio.run(main, [int(s) for s in args.sizes.split(",")], args.links, args.seed)
