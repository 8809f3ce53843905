"""Prefix-cache sharing between real daemons running the same tiny model: a hit gives the same greedy output
as a local prefill; a cache for another model or with a corrupted chunk is refused and the node computes."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from contextlib import asynccontextmanager

import msgpack
import numpy as np
import pytest

from knexa.net.rpc.schema import PackedBody
from knexa.net.rpc.tensor_stream import tensor_messages
from knexa.node.engine import GenerationRequest, SamplingParams
from knexa.node.inference_wire import META_TENSOR
from knexa.node.kvshare.service import PATH_LOCAL, PATH_PEER
from tests.conftest import p2p_addr, running_daemon, wait_for
from tests.engine_helpers import build_tiny_model

DOCUMENT = (
    "Peers exchange caches instead of text. The quick brown fox jumps over the lazy dog while the small "
    "language model runs on the edge of the network, and every node keeps what it has computed. "
)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "llama"))


async def _ready(daemon) -> bool:
    return daemon.inference.status()["state"] == "ready"


@asynccontextmanager
async def _pair(tmp_path, tiny_model):
    """Two daemons with the tiny model; one cache dir so both engines choose the same CPU dtype."""
    shared = tmp_path / "shared-cache"
    async with running_daemon(tmp_path / "a", model=tiny_model, cache_dir=shared) as a:
        await wait_for(lambda: _ready(a), 60)
        async with running_daemon(tmp_path / "b", [p2p_addr(a)], model=tiny_model, cache_dir=shared) as b:
            await wait_for(lambda: _ready(b), 60)
            yield a, b


def _prompt(daemon, question: str) -> list[int]:
    ids = daemon.kvshare.token_ids(DOCUMENT + question)
    assert len(ids) >= 2 * daemon.kvshare.settings.block, "the document must span two announced blocks"
    return ids


async def _shared_prefix_found(b, ids: list[int]) -> bool:
    length, providers = await b.kvshare.find_longest(b.kvshare.model_id(), ids)
    return length > 0 and bool(providers)


async def _announced(a, b) -> list[int]:
    """A answers a question about the document (so it holds and announces its cache); B's prompt, which shares
    the document, finds the announcement. Returns B's prompt."""
    await a.kvshare.generate(_prompt(a, "What jumps?"), SamplingParams(max_new_tokens=10))
    ids = _prompt(b, "Who keeps what?")
    await wait_for(lambda: _shared_prefix_found(b, ids), 30)
    return ids


async def _local(b, ids: list[int]) -> tuple[int, ...]:
    request = GenerationRequest(prompt_token_ids=ids, params=SamplingParams(max_new_tokens=10))
    return (await b.inference.require_engine().generate(request)).token_ids


def _force_fetch(daemon) -> None:
    # A tiny model computes a prefix faster than any fetch; the real decision is unit-tested in test_kvshare_units.
    daemon.kvshare.settings = dataclasses.replace(daemon.kvshare.settings, fetch="always")


async def test_prefix_hit_from_a_peer_gives_the_local_output(tmp_path, tiny_model):
    async with _pair(tmp_path, tiny_model) as (a, b):
        params = SamplingParams(max_new_tokens=10)
        ids = await _announced(a, b)
        assert a.kvshare.paths == {PATH_LOCAL: 1} and a.kvshare.store.stats()["entries"] == 1
        _force_fetch(b)
        result, outcome = await b.kvshare.generate(ids, params)
        assert outcome.path == PATH_PEER and outcome.provider == a.peer_id
        assert outcome.prefix_tokens % b.kvshare.settings.block == 0 and outcome.prefix_tokens >= 64
        assert outcome.computed_tokens == len(ids) - outcome.prefix_tokens
        assert result.token_ids == await _local(b, ids)
        assert a.kvshare.served == 1
        # b now holds the whole prompt: the same prompt again is a local hit computing nothing.
        again, outcome2 = await b.kvshare.generate(ids, params)
        assert outcome2.path == "local-cache" and outcome2.computed_tokens == 0 and again.token_ids == result.token_ids


def _with_wrong_model(payload: dict):
    meta = msgpack.unpackb(payload[META_TENSOR].tobytes())
    meta["weights_sha256"] = "f" * 64
    return tensor_messages(dict(payload, **{META_TENSOR: np.frombuffer(msgpack.packb(meta), dtype=np.uint8)}))


def _with_corrupted_chunk(payload: dict):
    for index, message in enumerate(tensor_messages(payload, chunk_size=4096)):
        if index == 2 and isinstance(message, PackedBody):
            body = bytearray(message.data)
            body[-1] ^= 0xFF  # a flipped bit in the data; the chunk's own digest matches the damaged bytes
            message = PackedBody(bytes(body), hashlib.sha256(body).digest())
        yield message


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [(_with_wrong_model, "PrefixRefused"), (_with_corrupted_chunk, "TensorStreamError: tensor stream digest mismatch")],
    ids=["wrong-model-hash", "corrupted-chunk"],
)
async def test_a_bad_cache_is_refused_and_the_node_prefills_locally(tmp_path, tiny_model, tamper, expected):
    async with _pair(tmp_path, tiny_model) as (a, b):
        params = SamplingParams(max_new_tokens=10)
        ids = await _announced(a, b)
        _force_fetch(b)
        a.kvshare.outgoing = tamper
        result, outcome = await b.kvshare.generate(ids, params)
        assert outcome.path == PATH_LOCAL and outcome.computed_tokens == len(ids)
        assert re.search(expected, outcome.reason, re.IGNORECASE), outcome.reason
        assert result.token_ids == await _local(b, ids)
        assert b.kvshare.refused == 1


async def test_measured_rates_choose_local_compute_over_a_slow_fetch(tmp_path, tiny_model):
    async with _pair(tmp_path, tiny_model) as (a, b):
        params = SamplingParams(max_new_tokens=10)
        await b.kvshare.generate(b.kvshare.token_ids("an unrelated prompt to measure the local prefill rate"))
        ids = await _announced(a, b)
        b.kvshare.fetch_rate.observe(1000, 10.0)  # as if an earlier fetch had moved 100 B/s
        result, outcome = await b.kvshare.generate(ids, params)
        assert outcome.path == PATH_LOCAL and "slower than computing" in outcome.reason
        assert a.kvshare.served == 0
        assert result.token_ids == await _local(b, ids)


async def test_a_stale_announcement_falls_back_to_a_local_prefill(tmp_path, tiny_model):
    from knexa.node.kvshare.prefix import PrefixStore

    async with _pair(tmp_path, tiny_model) as (a, b):
        params = SamplingParams(max_new_tokens=10)
        ids = await _announced(a, b)
        _force_fetch(b)
        a.kvshare.store = PrefixStore(a.kvshare.settings.store_bytes)  # evicted, announcement not yet expired
        result, outcome = await b.kvshare.generate(ids, params)
        assert outcome.path == PATH_LOCAL and "UNAVAILABLE" in outcome.reason.upper(), outcome.reason
        assert result.token_ids == await _local(b, ids)
