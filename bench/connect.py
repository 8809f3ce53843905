"""Time from dial to a usable stream between two nodes on loopback, beside raw TCP.

    python bench/connect.py [--dials 100]

Each libp2p sample is a fresh TCP + Noise + yamux connection and one negotiated
stream (ping) over it; the baseline is a plain TCP connect to a trio listener
in the same process.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import multiaddr
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.host.ping import ID as PING
from libp2p.peer.peerinfo import info_from_p2p_addr

from knexa.net.host import build_host, close_host

LOOPBACK = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def libp2p_dials(count: int) -> tuple[list[float], list[float]]:
    """(connect-only times, connect + first negotiated stream times) in ms."""
    server = build_host(create_new_key_pair(), LOOPBACK)
    samples, connects = [], []
    async with server.run(LOOPBACK):
        target = info_from_p2p_addr(server.get_addrs()[0])
        for _ in range(count):
            client = build_host(create_new_key_pair(), LOOPBACK)
            async with client.run(LOOPBACK):
                started = time.perf_counter()
                await client.connect(target)
                connects.append((time.perf_counter() - started) * 1000)
                stream = await client.new_stream(target.peer_id, [PING])
                samples.append((time.perf_counter() - started) * 1000)
                await stream.reset()
                await close_host(client)
        await close_host(server)
    return connects, samples


async def tcp_connects(count: int) -> list[float]:
    samples = []
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, _drain, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        for _ in range(count):
            started = time.perf_counter()
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            samples.append((time.perf_counter() - started) * 1000)
            await stream.aclose()
        nursery.cancel_scope.cancel()
    return samples


async def _drain(stream: trio.SocketStream) -> None:
    async with stream:
        while await stream.receive_some(4096):
            pass


async def main(count: int) -> None:
    tcp = await tcp_connects(count)
    connects, p2p = await libp2p_dials(count)
    print(f"{count} dials on loopback")
    print(f"{'':34}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}")
    rows = (
        ("raw TCP connect", tcp),
        ("libp2p connect (TCP+Noise+yamux)", connects),
        ("libp2p connect + usable stream", p2p),
    )
    for name, samples in rows:
        print(
            f"{name:34}{percentile(samples, 0.5):10.2f}{percentile(samples, 0.99):10.2f}"
            f"{statistics.fmean(samples):10.2f}"
        )
    print(f"ratio libp2p/TCP (p50): {percentile(p2p, 0.5) / percentile(tcp, 0.5):.0f}x  "
          f"target: libp2p p50 under 20 ms -> {'met' if percentile(p2p, 0.5) < 20 else 'NOT met'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dials", type=int, default=100)
    trio.run(main, parser.parse_args().dials)
