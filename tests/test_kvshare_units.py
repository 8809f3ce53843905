"""Prefix-cache sharing, pure parts: the byte-bounded store and its keys, the fetch plan, and the engine's
prefill on top of an imported prefix (a real tiny model, no sockets)."""

from __future__ import annotations

import pytest
import torch

from knexa.node.engine import Engine, GenerationRequest, IncompatibleCache, SamplingParams
from knexa.node.kvshare.plan import RateMeter, plan_fetch
from knexa.node.kvshare.prefix import (
    PrefixStore,
    block_key,
    block_lengths,
    cache_model_id,
    cache_nbytes,
    common_prefix,
    slice_cache,
)
from tests.engine_helpers import engine_config, greedy, shared_tiny_model


def fake_cache(token_ids: list[int], layers: int = 2, weights: str = "w" * 64) -> tuple[dict, dict]:
    n = len(token_ids)
    tensors = {}
    for i in range(layers):
        tensors[f"layers.{i}.keys"] = torch.arange(n, dtype=torch.float32).reshape(1, 1, n, 1).repeat(1, 2, 1, 4)
        tensors[f"layers.{i}.values"] = -tensors[f"layers.{i}.keys"]
    meta = {"weights_sha256": weights, "dtype": "float32", "adapter": None, "token_ids": list(token_ids)}
    return tensors, meta


def test_block_lengths_and_keys() -> None:
    assert block_lengths(130, 64) == [64, 128]
    assert block_lengths(63, 64) == []
    assert block_lengths(1000, 64, max_blocks=3) == [64, 128, 192]
    ids = list(range(200))
    assert block_key("m", ids, 64) == block_key("m", ids[:64] + [7] * 10, 64)
    assert block_key("m", ids, 64) != block_key("other", ids, 64)
    assert block_key("m", ids, 64) != block_key("m", ids, 128)
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2


def test_model_id_covers_weights_dtype_and_adapter() -> None:
    _, meta = fake_cache([1, 2])
    assert cache_model_id(meta) != cache_model_id(dict(meta, dtype="bfloat16"))
    assert cache_model_id(meta) != cache_model_id(dict(meta, adapter="style"))


def test_slice_cache_cuts_tokens_and_metadata() -> None:
    tensors, meta = fake_cache(list(range(10)))
    cut, cut_meta = slice_cache(tensors, meta, 4)
    assert cut_meta["token_ids"] == [0, 1, 2, 3] and meta["token_ids"] == list(range(10))
    assert cut["layers.1.keys"].shape == (1, 2, 4, 4) and cut["layers.1.keys"].is_contiguous()
    assert torch.equal(cut["layers.0.values"], tensors["layers.0.values"][:, :, :4])
    with pytest.raises(ValueError):
        slice_cache(tensors, meta, 11)


def test_store_is_bounded_by_bytes_and_evicts_the_least_recently_used() -> None:
    a, b, c = fake_cache(list(range(8))), fake_cache(list(range(100, 108))), fake_cache(list(range(200, 208)))
    size = cache_nbytes(a[0])
    store = PrefixStore(max_bytes=2 * size, block=4)
    added = store.put(*a).added
    assert len(added) == 2 and store.put(*a).added == []  # the same cache again changes nothing
    store.put(*b)
    assert store.lookup(cache_model_id(a[1]), list(range(4))) is not None  # a is now the most recent
    change = store.put(*c)
    assert store.bytes_used == 2 * size and len(store) == 2 and store.evictions == 1
    assert change.removed == [block_key(cache_model_id(b[1]), b[1]["token_ids"], n) for n in (4, 8)]
    assert store.lookup(cache_model_id(b[1]), list(range(100, 104))) is None
    # A cache larger than the whole store is not kept (and evicts nothing).
    big = fake_cache(list(range(50)))
    assert store.put(*big).added == [] and len(store) == 2


def test_store_lookup_and_longest_prefix() -> None:
    tensors, meta = fake_cache(list(range(20)))
    store = PrefixStore(max_bytes=1 << 20, block=8)
    store.put(tensors, meta)
    model = cache_model_id(meta)
    found = store.lookup(model, list(range(8)))
    assert found is not None and found[1]["token_ids"] == list(range(8))
    assert found[0]["layers.0.keys"].shape[2] == 8
    assert store.lookup(model, [0, 1, 9]) is None
    assert store.lookup("another-model", list(range(8))) is None
    held, entry = store.longest(model, list(range(13)) + [99, 100])
    assert held == 13 and entry is not None
    assert store.longest("another-model", list(range(13)))[0] == 0


def test_rate_meter_averages_and_ignores_empty_samples() -> None:
    meter = RateMeter(weight=0.5)
    assert meter.rate is None
    meter.observe(0, 1.0)
    assert meter.rate is None
    meter.observe(100, 1.0)
    meter.observe(300, 1.0)
    assert meter.rate == pytest.approx(200.0) and meter.samples == 2


def test_fetch_plan_follows_the_measured_rates() -> None:
    # No local rate yet: try the fetch under the generous deadline.
    first = plan_fetch(500, 1000, None, None, unmeasured_deadline_s=9.0)
    assert first.fetch and first.deadline_s == 9.0
    # Computing 500 tokens at 100 tok/s takes 5 s; moving 500 KB at 1 MB/s about 0.5 s: fetch, deadline 5 s.
    fast = plan_fetch(500, 1000, 100.0, 1e6)
    assert fast.fetch and fast.deadline_s == pytest.approx(5.0) and fast.estimated_fetch_s < 1
    # A slow link: computing wins, no fetch.
    slow = plan_fetch(500, 1000, 100.0, 1e4)
    assert not slow.fetch and "slower than computing" in slow.reason
    # Unknown link speed but a known compute rate: try, abandoning it once computing would have finished.
    probe = plan_fetch(500, 1000, 1000.0, None)
    assert probe.fetch and probe.deadline_s == pytest.approx(0.5)
    assert not plan_fetch(10, 1000, 100.0, 1e9, min_tokens=64).fetch


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return shared_tiny_model(tmp_path_factory, "llama")


async def test_engine_prefill_on_a_prefix_equals_a_full_prefill(model_dir) -> None:
    async with Engine.open(engine_config(model_dir)) as engine:
        full_kv, full_meta = await engine.prefill("Peers exchange caches and the lazy dog sleeps")
        ids = full_meta["token_ids"]
        prefix = slice_cache(full_kv, full_meta, len(ids) // 2)
        kv, meta = await engine.prefill(ids, prefix=prefix)
        assert meta["token_ids"] == ids
        for name, tensor in full_kv.items():
            torch.testing.assert_close(kv[name], tensor, rtol=1e-4, atol=1e-4)
        whole = await engine.prefill(ids, prefix=(full_kv, full_meta))  # nothing left to compute
        assert whole[1]["token_ids"] == ids
        request = GenerationRequest(params=SamplingParams(max_new_tokens=12))
        from_cache = await engine.generate_from_cache(kv, meta, request=request)
        local = await engine.generate(greedy(ids))
        assert from_cache.token_ids == local.token_ids
        # Not a prefix of the prompt, or another adapter: refused with the reason.
        other = slice_cache(*await engine.prefill("hello world and more"), 3)
        with pytest.raises(IncompatibleCache, match="prefix"):
            await engine.prefill(ids, prefix=other)
        with pytest.raises(IncompatibleCache, match="adapter"):
            await engine.prefill(ids, prefix=(prefix[0], dict(prefix[1], adapter="x")))
        with pytest.raises(IncompatibleCache, match="another model"):
            await engine.prefill(ids, prefix=(prefix[0], dict(prefix[1], weights_sha256="0" * 64)))
