"""Ledger convergence over real daemons, one OS process each, on loopback.

    python bench/ledger_procs.py [--nodes 50] [--links 3] [--writes 10]

Starts N `knexa-node start` processes (no model); each bootstraps from `--links`
random earlier nodes. Once every node holds every node's profile, a random
node writes a signed reputation report (`POST /v1/ledger/reports`) while every
node waits for it (`GET /v1/ledger/wait`), which returns that node's clock at
the moment the entry arrived. All processes share one machine clock, so the
spread time is the last arrival minus the writer's own timestamp on the entry.
The baseline beside it, measured in the same run, is one local API round trip.
Each daemon's CPU (from /proc) is sampled while the mesh is idle and during the writes.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import trio

CLI = [sys.executable, "-m", "knexa.cli.main"]
TARGET_S = 2.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Proc:
    process: subprocess.Popen[bytes]
    api: str
    token: str
    peer_id: str
    addr: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def spawn(args: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)


async def start(
    data_dir: Path, bootstrap: list[str], client: httpx.AsyncClient, extra: list[str] | None = None
) -> Proc:
    port, api_port = free_port(), free_port()
    args = [*CLI, "start", "--data-dir", str(data_dir), "--listen", f"/ip4/127.0.0.1/tcp/{port}",
            "--api-port", str(api_port), "--model", "none", "--ping-interval", "10", "--log-level", "warning"]
    for addr in bootstrap:
        args += ["--bootstrap", addr]
    args += extra or []
    log_path = data_dir.parent / f"{data_dir.name}.log"
    process = spawn(args, log_path)
    api = f"http://127.0.0.1:{api_port}"
    with trio.fail_after(60):
        while True:
            if process.poll() is not None:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
                raise RuntimeError(f"node exited with {process.returncode}: {' | '.join(tail)}")
            try:
                health = (await client.get(f"{api}/v1/health")).json()
                break
            except httpx.HTTPError:
                await trio.sleep(0.1)
    token = (data_dir / "api.token").read_text().strip()
    peer_id = health["peer_id"]
    return Proc(process, api, token, peer_id, f"/ip4/127.0.0.1/tcp/{port}/p2p/{peer_id}")


async def profiles_held(node: Proc, client: httpx.AsyncClient) -> int:
    for attempt in range(3):
        try:
            entries = (await client.get(f"{node.api}/v1/ledger", headers=node.headers)).json()["entries"]
            break
        except httpx.RemoteProtocolError:
            # A kept-alive connection the server closed (idle past Hypercorn's 5 s) just as it was reused.
            if attempt == 2:
                raise
    return sum(1 for e in entries if e["kind"] == "profile" and not e["deleted"])


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def cpu_percent(nodes: list[Proc], seconds: float) -> list[float]:
    """Each daemon's CPU use over the next `seconds`, in % of one core."""
    before = [cpu_seconds(n.process.pid) for n in nodes]
    started = time.perf_counter()
    await trio.sleep(seconds)
    elapsed = time.perf_counter() - started
    return [100 * (cpu_seconds(n.process.pid) - b) / elapsed for n, b in zip(nodes, before, strict=True)]


def describe_cpu(label: str, samples: list[list[float]]) -> str:
    per_node = [statistics.mean(s) for s in zip(*samples, strict=True)]
    totals = [sum(s) for s in samples]
    return (f"{label}: per daemon mean {statistics.mean(per_node):.2f}% of a core (max {max(per_node):.2f}%), "
            f"all daemons {min(totals):.0f}-{max(totals):.0f}% over {len(samples)} samples")


async def one_write(nodes: list[Proc], writer: Proc, subject: Proc, client: httpx.AsyncClient) -> list[float]:
    """Seconds from the write to its arrival at each other node."""
    key = f"report/{writer.peer_id}/{subject.peer_id}"  # crdt.namespace.report_key
    arrivals: dict[str, int | None] = {}

    async def wait(node: Proc, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        reply = await client.get(f"{node.api}/v1/ledger/wait", params={"key": key, "timeout_s": 30},
                                 headers=node.headers, timeout=40)
        arrivals[node.peer_id] = reply.json()["seen_at_ms"]

    async with trio.open_nursery() as nursery:
        for node in nodes:
            if node is not writer:
                await nursery.start(wait, node)
        await trio.sleep(0.5)  # every wait is parked in its daemon before the write
        reply = await client.post(f"{writer.api}/v1/ledger/reports", headers=writer.headers,
                                  json={"subject": subject.peer_id, "score": random.random(), "reason": "bench"})
        reply.raise_for_status()
        written_ms = reply.json()["clock"]["wall_ms"]
    missing = [p for p, t in arrivals.items() if t is None]
    if missing:
        raise RuntimeError(f"{len(missing)} nodes never saw the write within 30 s")
    return sorted((t - written_ms) / 1000 for t in arrivals.values() if t is not None)


async def main(n: int, links: int, writes: int, seed: int, idle_s: float) -> None:
    rng = random.Random(seed)
    random.seed(seed)
    limits = httpx.Limits(max_connections=4 * n)
    with tempfile.TemporaryDirectory() as tmp:
        nodes: list[Proc] = []
        async with httpx.AsyncClient(timeout=30, limits=limits) as client:
            try:
                began = time.perf_counter()
                for i in range(n):
                    bootstrap = [p.addr for p in rng.sample(nodes, min(links, len(nodes)))]
                    nodes.append(await start(Path(tmp) / f"n{i}", bootstrap, client))
                started_s = time.perf_counter() - began
                print(f"{n} daemons started in {started_s:.1f} s (each dials {links} earlier nodes)", flush=True)
                began = time.perf_counter()
                with trio.fail_after(300):
                    while True:
                        held = [await profiles_held(node, client) for node in nodes]
                        if min(held) == n:
                            break
                        await trio.sleep(2)
                print(f"every profile on every node {time.perf_counter() - began:.1f} s after the last start",
                      flush=True)
                rtts = []
                for _ in range(20):
                    t0 = time.perf_counter()
                    await client.get(f"{nodes[0].api}/v1/health")
                    rtts.append(time.perf_counter() - t0)
                if idle_s > 0:
                    idle = [await cpu_percent(nodes, idle_s / 3) for _ in range(3)]
                    print(describe_cpu(f"idle CPU ({n} daemons, load {os.getloadavg()[0]:.1f})", idle), flush=True)
                spread: list[float] = []
                per_node: list[float] = []
                before = [cpu_seconds(node.process.pid) for node in nodes]
                began = time.perf_counter()
                pairs: set[tuple[str, str]] = set()
                for _ in range(writes):
                    writer, subject = rng.sample(nodes, 2)
                    while (writer.peer_id, subject.peer_id) in pairs:  # a repeat would find the old entry
                        writer, subject = rng.sample(nodes, 2)
                    pairs.add((writer.peer_id, subject.peer_id))
                    arrivals = await one_write(nodes, writer, subject, client)
                    spread.append(arrivals[-1])
                    per_node.extend(arrivals)
                    late = [f"{a:.2f}" for a in arrivals if a > 0.5]
                    print(f"  write: last node {arrivals[-1] * 1000:.0f} ms, "
                          f"median node {statistics.median(arrivals) * 1000:.0f} ms"
                          + (f", arrivals after 0.5 s (s): {' '.join(late)}" if late else ""), flush=True)
                    await trio.sleep(1)
                busy = [cpu_seconds(node.process.pid) - b for node, b in zip(nodes, before, strict=True)]
                busy_pct = 100 * statistics.mean(busy) / (time.perf_counter() - began)
                p50, worst = statistics.median(spread), max(spread)
                p95 = sorted(spread)[math.ceil(0.95 * len(spread)) - 1]  # nearest rank
                print(f"one write reaches all {n} nodes: p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, "
                      f"max {worst * 1000:.0f} ms over {writes} writes "
                      f"(target {TARGET_S:.0f} s: {'met' if worst <= TARGET_S else 'NOT met'}); "
                      f"one node's arrival p50 {statistics.median(per_node) * 1000:.0f} ms; "
                      f"baseline local API round trip p50 {statistics.median(rtts) * 1000:.1f} ms; "
                      f"CPU per daemon during the writes {busy_pct:.2f}%", flush=True)
            finally:
                for i, node in enumerate(nodes):
                    if node.process.poll() is not None:
                        tail = (Path(tmp) / f"n{i}.log").read_text(errors="replace").strip().splitlines()[-5:]
                        print(f"node {i} exited early ({node.process.returncode}):", *tail, sep="\n  ")
                for node in nodes:
                    node.process.send_signal(signal.SIGTERM)
                for node in nodes:
                    try:
                        node.process.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        os.kill(node.process.pid, signal.SIGKILL)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument("--links", type=int, default=3)
    parser.add_argument("--writes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--idle-s", type=float, default=30.0, help="seconds of idle CPU sampling (0: skip)")
    args = parser.parse_args()
    trio.run(main, args.nodes, args.links, args.writes, args.seed, args.idle_s)
