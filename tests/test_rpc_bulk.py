"""A 256 MiB tensor stream between real hosts: bit-identical, with bounded memory."""

from __future__ import annotations

import hashlib
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import trio

from knexa.net.rpc import CallContext, TensorSpec, iter_tensor_events, send_tensor_stream
from knexa.net.rpc.tensor_stream import StreamEnd, TensorData, TensorEnd, TensorStart

sys.path.insert(0, str(Path(__file__).parent))  # pytest runs with --import-mode=importlib
from rpc_helpers import rpc_nodes  # noqa: E402

MiB = 1024 * 1024
TOTAL = 256 * MiB
CHUNK = 1 * MiB
LAYERS = 8


def kv_specs() -> list[TensorSpec]:
    per_layer = TOTAL // LAYERS // 2  # bytes per F16 tensor
    return [TensorSpec(f"layer{i}.{kv}", "F16", (per_layer // 2,))
            for i in range(LAYERS) for kv in ("k", "v")]


def payload(seed: int) -> Iterator[bytes]:
    """The stream's bytes, generated deterministically one chunk at a time."""
    rng = np.random.default_rng(seed)
    for _ in range(TOTAL // CHUNK):
        yield rng.bytes(CHUNK)


async def test_256_mib_tensor_stream_is_bit_identical_in_bounded_memory() -> None:
    seed = 1234
    expected = hashlib.sha256()
    for piece in payload(seed):
        expected.update(piece)

    async with rpc_nodes(2) as (a, b):
        async def export_kv(req: dict, ctx: CallContext) -> None:
            await send_tensor_stream(ctx.send, kv_specs(), payload(req["seed"]),
                                     chunk_size=CHUNK)

        b.rpc.register("kv.export", export_kv, dict, kind="server_stream")
        received = hashlib.sha256()
        names: list[str] = []
        ends = 0
        tracemalloc.start()
        try:
            start = time.perf_counter()
            with trio.fail_after(120):
                async with a.rpc.server_stream(b.peer_id, "kv.export", {"seed": seed}) as resp:
                    async for ev in iter_tensor_events(resp, max_total=TOTAL):
                        if isinstance(ev, TensorData):
                            received.update(ev.data)
                        elif isinstance(ev, TensorStart):
                            names.append(ev.spec.name)
                        elif isinstance(ev, TensorEnd):
                            ends += 1
                        elif isinstance(ev, StreamEnd):
                            assert ev.total == TOTAL
            elapsed = time.perf_counter() - start
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert received.digest() == expected.digest()  # bit-identical
    assert names == [s.name for s in kv_specs()] and ends == len(names)
    # both sides live in this process: sender, receiver, yamux buffers, all of it
    assert peak < 64 * MiB, f"peak traced memory {peak / MiB:.1f} MiB"
    print(f"256 MiB in {elapsed:.2f} s ({TOTAL / MiB / elapsed:.0f} MiB/s under tracemalloc), "
          f"peak {peak / MiB:.1f} MiB")
