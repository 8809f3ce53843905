"""RPC benchmark on loopback: unary latency and bulk tensor throughput vs raw TCP.

Run: python bench/rpc.py [--calls N] [--mib M] [--chunk KIB] [--one-process]
                         [--profile FILE]

First both peers in this one process (they share one core's worth of Python),
beside plain trio-socket TCP and a plain libp2p stream measured the same way;
then, unless --one-process, against a server peer in a child process, as
between two real nodes. CPU time per MiB is printed too: on a shared machine
it says more than wall-clock throughput.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from functools import partial
from typing import Any

import multiaddr
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID as PeerID
from libp2p.peer.peerinfo import info_from_p2p_addr

from knexa.net.host import build_host
from knexa.net.rpc import CallContext, RpcService, TensorSpec, send_tensor_stream
from knexa.net.rpc.tensor_stream import StreamEnd, iter_tensor_events

MiB = 1024 * 1024
LOOPBACK = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
SMALL = {"prompt": "x" * 64, "n": 1}


def percentiles(samples: list[float]) -> tuple[float, float]:
    s = sorted(samples)
    return s[len(s) // 2] * 1000, s[min(len(s) - 1, int(len(s) * 0.99))] * 1000


# -- raw TCP ----------------------------------------------------------------------

async def tcp_latency(calls: int) -> list[float]:
    async def echo(stream: trio.SocketStream) -> None:
        async for data in stream:
            await stream.send_all(data)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, echo, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        client = await trio.open_tcp_stream("127.0.0.1", port)
        msg = b"x" * 100
        samples = []
        for _ in range(calls):
            t = time.perf_counter()
            await client.send_all(msg)
            got = 0
            while got < len(msg):
                got += len(await client.receive_some(65536))
            samples.append(time.perf_counter() - t)
        await client.aclose()
        nursery.cancel_scope.cancel()
    return samples


async def tcp_throughput(total: int) -> float:
    done = trio.Event()
    result: dict[str, float] = {}

    async def sink(stream: trio.SocketStream) -> None:
        n = 0
        while n < total:
            data = await stream.receive_some(4 * MiB)
            if not data:
                break
            n += len(data)
        result["end"] = time.perf_counter()
        done.set()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, sink, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        client = await trio.open_tcp_stream("127.0.0.1", port)
        chunk = b"\x00" * MiB
        start = time.perf_counter()
        for _ in range(total // MiB):
            await client.send_all(chunk)
        await done.wait()
        await client.aclose()
        nursery.cancel_scope.cancel()
    return total / MiB / (result["end"] - start)


# -- libp2p + RPC -------------------------------------------------------------------

def register_bench_methods(svc: RpcService, total: int, chunk: int) -> None:
    block = bytes(range(256)) * (chunk // 256)
    specs = [TensorSpec(f"layer{i}.kv", "F16", (total // 8 // 2,)) for i in range(8)]

    async def echo(req: Any, ctx: CallContext) -> Any:
        return req

    async def export(req: Any, ctx: CallContext) -> None:
        cpu = time.process_time()
        await send_tensor_stream(ctx.send, specs, (block for _ in range(total // chunk)),
                                 chunk_size=chunk)
        if req and req.get("report_cpu"):
            cpu_ms = (time.process_time() - cpu) / (total / MiB) * 1000
            print(f"  (server peer process CPU while sending: {cpu_ms:.2f} ms/MiB)",
                  file=sys.stderr, flush=True)

    svc.register("bench.echo", echo)
    svc.register("bench.kv", export, kind="server_stream")


async def with_rpc_pair(fn: Callable[[RpcService, RpcService], Awaitable[Any]]) -> Any:
    async with AsyncExitStack() as stack:
        services = []
        for _ in range(2):
            kp = create_new_key_pair()
            host = build_host(kp, LOOPBACK)
            await stack.enter_async_context(host.run(LOOPBACK))
            services.append(RpcService(host, kp))
        a, b = services
        await a.host.connect(info_from_p2p_addr(b.host.get_addrs()[0]))
        for svc in services:
            await stack.enter_async_context(svc.running())
        return await fn(a, b)


async def raw_stream_throughput(a: RpcService, b: RpcService, total: int, proto: str) -> float:
    """Plain libp2p stream (Noise + yamux), 1 MiB writes, for reference."""
    done = trio.Event()
    result: dict[str, float] = {}

    async def sink(stream: Any) -> None:
        n = 0
        while n < total:
            data = await stream.read(4 * MiB)
            if not data:
                break
            n += len(data)
        result["end"] = time.perf_counter()
        done.set()

    b.host.set_stream_handler(proto, sink)
    stream = await a.host.new_stream(b.host.get_id(), [proto])
    chunk = b"\x00" * MiB
    start = time.perf_counter()
    for _ in range(total // MiB):
        await stream.write(chunk)
    await done.wait()
    await stream.close()
    return total / MiB / (result["end"] - start)


async def unary_latency(a: RpcService, server: PeerID, calls: int) -> tuple[float, float]:
    for _ in range(50):  # warm up: stream open, key caches
        await a.call(server, "bench.echo", SMALL)
    samples = []
    for _ in range(calls):
        t = time.perf_counter()
        await a.call(server, "bench.echo", SMALL, timeout=10)
        samples.append(time.perf_counter() - t)
    return percentiles(samples)


async def bulk(a: RpcService, server: PeerID, total: int, report_cpu: bool) -> tuple[float, float]:
    """Throughput (MiB/s) of one tensor stream and this process's CPU per MiB."""
    start, cpu = time.perf_counter(), time.process_time()
    got = 0
    async with a.server_stream(server, "bench.kv", {"report_cpu": report_cpu},
                               timeout=600) as responses:
        async for ev in iter_tensor_events(responses, max_total=total):
            if isinstance(ev, StreamEnd):
                got = ev.total
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert got == total
    return total / MiB / elapsed, cpu / (total / MiB) * 1000


# -- the two-process run -------------------------------------------------------------

async def serve(args: argparse.Namespace) -> None:
    """Child process: one peer that serves the bench methods until stdin closes."""
    kp = create_new_key_pair()
    host = build_host(kp, LOOPBACK)
    async with host.run(LOOPBACK):
        svc = RpcService(host, kp)
        register_bench_methods(svc, args.mib * MiB, args.chunk * 1024)
        async with svc.running():
            print(f"{host.get_addrs()[0]}", flush=True)
            await trio.wrap_file(sys.stdin).read()


async def two_process(args: argparse.Namespace) -> tuple[tuple[float, float], float, float]:
    cmd = [sys.executable, __file__, "--serve", "--mib", str(args.mib),
           "--chunk", str(args.chunk)]
    async with trio.open_nursery() as nursery:
        proc = await nursery.start(partial(trio.run_process, cmd, stdin=subprocess.PIPE,
                                           stdout=subprocess.PIPE, check=False))
        line = b""
        with trio.fail_after(60):
            while not line.endswith(b"\n"):
                line += await proc.stdout.receive_some(4096)
        info = info_from_p2p_addr(multiaddr.Multiaddr(line.decode().strip()))
        kp = create_new_key_pair()
        host = build_host(kp, LOOPBACK)
        async with host.run(LOOPBACK):
            svc = RpcService(host, kp)
            await host.connect(info)
            async with svc.running():
                latency = await unary_latency(svc, info.peer_id, args.calls)
                throughput, recv_cpu = await bulk(svc, info.peer_id, args.mib * MiB, True)
        await proc.stdin.aclose()
        with trio.move_on_after(10):
            await proc.wait()
        proc.kill()
    return latency, throughput, recv_cpu


async def main(args: argparse.Namespace) -> None:
    if args.serve:
        await serve(args)
        return
    total = args.mib * MiB
    tcp_lat = percentiles(await tcp_latency(args.calls))
    tcp_tp = await tcp_throughput(total)

    async def suite(a: RpcService, b: RpcService) -> tuple[Any, ...]:
        register_bench_methods(b, total, args.chunk * 1024)
        # py-libp2p's own yamux behaviour, then with the knob RpcService sets
        os.environ["PY_YAMUX_RELEASE_ON_READ"] = "1"
        raw_default = await raw_stream_throughput(a, b, total, "/bench/raw/1")
        os.environ["PY_YAMUX_RELEASE_ON_READ"] = "0"
        raw_tuned = await raw_stream_throughput(a, b, total, "/bench/raw/2")
        lat = await unary_latency(a, b.peer_id, args.calls)
        prof = cProfile.Profile() if args.profile else None
        if prof:
            prof.enable()
        tp, cpu = await bulk(a, b.peer_id, total, False)
        if prof:
            prof.disable()
            prof.dump_stats(args.profile)
        return raw_default, raw_tuned, lat, tp, cpu

    raw_default, raw_tuned, lat, tp, cpu = await with_rpc_pair(suite)
    print(f"one process, {args.calls} unary calls with a small body:")
    print(f"  knexa rpc (TCP+Noise+yamux, signed both ways): p50 {lat[0]:.3f} ms  "
          f"p99 {lat[1]:.3f} ms")
    print(f"  raw TCP echo (trio sockets):                   p50 {tcp_lat[0]:.3f} ms  "
          f"p99 {tcp_lat[1]:.3f} ms")
    print(f"one process, {args.mib} MiB bulk:")
    print(f"  knexa rpc tensor stream ({args.chunk} KiB chunks, signed, sha256): "
          f"{tp:.0f} MiB/s  (CPU of both peers: {cpu:.2f} ms/MiB)")
    print(f"  plain libp2p stream, 1 MiB writes, py-libp2p defaults: {raw_default:.0f} MiB/s")
    print(f"  plain libp2p stream, 1 MiB writes, RELEASE_ON_READ=0:  {raw_tuned:.0f} MiB/s")
    print(f"  raw TCP (trio sockets, 1 MiB sends): {tcp_tp:.0f} MiB/s")
    if not args.one_process:
        (p50, p99), tp2, recv_cpu = await two_process(args)
        print("two processes (the server peer in a child process, as between real nodes):")
        print(f"  knexa rpc unary: p50 {p50:.3f} ms  p99 {p99:.3f} ms")
        print(f"  knexa rpc tensor stream: {tp2:.0f} MiB/s  (client peer process CPU while "
              f"receiving: {recv_cpu:.2f} ms/MiB)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=1024, help="tensor chunk size in KiB")
    parser.add_argument("--profile", help="write a cProfile of the one-process bulk run here")
    parser.add_argument("--one-process", action="store_true", help="skip the two-process run")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    trio.run(main, parser.parse_args())
