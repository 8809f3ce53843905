"""`diag.echo`: a signed RPC that returns its payload, to check and time a path to a peer."""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any

from libp2p.peer.id import ID as PeerID
from pydantic import BaseModel, Field

METHOD_ECHO = "diag.echo"
MAX_ECHO_BYTES = 1024 * 1024


class EchoMessage(BaseModel):
    payload: bytes = Field(max_length=MAX_ECHO_BYTES)


async def _handle_echo(request: EchoMessage, ctx: Any) -> EchoMessage:
    return EchoMessage(payload=request.payload)


def register_echo(rpc: Any) -> None:
    rpc.register(METHOD_ECHO, _handle_echo, EchoMessage, EchoMessage)


async def measure_echo(rpc: Any, peer: PeerID, size: int, count: int, timeout_s: float = 30.0) -> dict[str, Any]:
    """`count` echo calls of `size` random bytes; every reply is checked byte for byte.

    Returns latency percentiles and the throughput (payload bytes each way / wall time)."""
    if not 0 < size <= MAX_ECHO_BYTES or not 0 < count <= 10_000:
        raise ValueError(f"size must be 1..{MAX_ECHO_BYTES} and count 1..10000")
    latencies = []
    mismatches = 0
    started = time.perf_counter()
    for _ in range(count):
        payload = os.urandom(size)
        t0 = time.perf_counter()
        reply = await rpc.call(peer, METHOD_ECHO, EchoMessage(payload=payload), timeout=timeout_s,
                               response_model=EchoMessage)
        latencies.append(time.perf_counter() - t0)
        if hashlib.sha256(reply.payload).digest() != hashlib.sha256(payload).digest():
            mismatches += 1
    wall = time.perf_counter() - started
    latencies.sort()
    return {
        "calls": count,
        "size": size,
        "mismatches": mismatches,
        "seconds": round(wall, 4),
        "p50_ms": round(latencies[len(latencies) // 2] * 1000, 3),
        "p99_ms": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000, 3),
        "mib_per_s": round(size * count / wall / (1024 * 1024), 3),
        # the connection(s) the calls actually went over
        "rpc_paths": rpc.session_paths(peer),
    }
