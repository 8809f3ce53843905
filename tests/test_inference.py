"""The engine inside real daemons: OpenAI API, RPC generate/prefill, KV across nodes, ledger profile."""

from __future__ import annotations

import httpx
import pytest
from libp2p.peer.id import ID as PeerID

from knexa.net.rpc import ErrorCode, RpcError
from knexa.node.engine import GenerationRequest, SamplingParams
from knexa.node.inference_wire import PrefillCall, remote_prefill
from tests.conftest import api_get, p2p_addr, running_daemon, wait_for
from tests.engine_helpers import build_tiny_model

QUESTION = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "llama"))


async def _ready(daemon) -> bool:
    return (await api_get(daemon, "/v1/engine")).json()["state"] == "ready"


async def _post(daemon, path: str, body: dict) -> httpx.Response:
    async with httpx.AsyncClient(base_url=daemon.api_url, timeout=60) as client:
        return await client.post(path, json=body, headers={"Authorization": f"Bearer {daemon.api_token}"})


async def test_openai_client_streams_a_completion(tmp_path, tiny_model):
    from openai import AsyncOpenAI

    async with running_daemon(tmp_path / "a", model=tiny_model) as a:
        await wait_for(lambda: _ready(a), 60)
        client = AsyncOpenAI(base_url=a.api_url + "/v1", api_key=a.api_token)
        models = await client.models.list()
        name = models.data[0].id
        stream = await client.chat.completions.create(
            model=name, messages=QUESTION, max_tokens=8, stream=True
        )
        pieces, finish = [], None
        async for chunk in stream:
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
        assert "".join(pieces) and finish in ("stop", "length")
        whole = await client.chat.completions.create(model=name, messages=QUESTION, max_tokens=8)
        assert whole.choices[0].message.content == "".join(pieces)  # greedy both times
        assert whole.usage.completion_tokens > 0
        await client.close()


async def test_kv_cache_prefilled_on_a_continues_on_b(tmp_path, tiny_model):
    # The engines pick their CPU dtype by timing a few steps; a KV cache only
    # moves between engines of one dtype, so B reuses the choice A recorded.
    shared = tmp_path / "shared-cache"
    async with running_daemon(tmp_path / "a", model=tiny_model, cache_dir=shared) as a:
        await wait_for(lambda: _ready(a), 60)
        async with running_daemon(tmp_path / "b", [p2p_addr(a)], model=tiny_model, cache_dir=shared) as b:
            await wait_for(lambda: _ready(b), 60)
            assert (await api_get(a, "/v1/engine")).json()["dtype"] == (await api_get(b, "/v1/engine")).json()["dtype"]
            prompt = "the quick brown fox"
            kv, meta = await remote_prefill(b.rpc, PeerID.from_base58(a.peer_id), PrefillCall(prompt=prompt))
            assert meta["token_ids"] and meta["num_layers"] * 2 == len(kv)
            params = SamplingParams(max_new_tokens=10)
            engine_b = b.inference.require_engine()
            from_cache = await engine_b.generate_from_cache(kv, meta, request=GenerationRequest(params=params))
            local = await engine_b.generate(
                GenerationRequest(prompt_token_ids=meta["token_ids"], params=params)
            )
            assert from_cache.token_ids == local.token_ids


async def test_nodes_with_separate_caches_agree_on_a_dtype_they_are_given(tmp_path, tiny_model):
    # Separate caches measure their CPU dtype apart and may differ; the dtype key pins it.
    pinned = {"model": tiny_model, "dtype": "bfloat16"}
    async with running_daemon(tmp_path / "a", cache_dir=tmp_path / "cache-a", **pinned) as a, \
            running_daemon(tmp_path / "b", cache_dir=tmp_path / "cache-b", **pinned) as b:
        for node in (a, b):
            await wait_for(lambda node=node: _ready(node), 60)
            assert (await api_get(node, "/v1/engine")).json()["dtype"] == "bfloat16"


async def test_remote_completion_and_profile_in_the_ledger(tmp_path, tiny_model):
    async with running_daemon(tmp_path / "a", model=tiny_model) as a:
        async with running_daemon(tmp_path / "b", [p2p_addr(a)]) as b:  # b runs no model
            await wait_for(lambda: _ready(a), 60)
            body = {"messages": QUESTION, "max_tokens": 6, "peer": a.peer_id}
            response = await _post(b, "/v1/chat/completions", body)
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["message"]["content"]
            local = await _post(b, "/v1/chat/completions", {"messages": QUESTION})
            assert local.status_code == 503 and "no model" in local.text
            modelless = await _post(a, "/v1/chat/completions", {"messages": QUESTION, "peer": b.peer_id})
            assert modelless.status_code == 503 and f"peer {b.peer_id} runs no model" in modelless.text
            with pytest.raises(RpcError) as refused:  # every engine method of b says why, not "unknown method"
                await remote_prefill(a.rpc, PeerID.from_base58(b.peer_id), PrefillCall(prompt="x"))
            assert refused.value.code == ErrorCode.UNAVAILABLE and "runs no model" in str(refused.value)

            def a_profile_has_model() -> bool:
                profile = b.ledger.profiles().get(a.peer_id)
                return bool(profile and profile.models)

            await wait_for(a_profile_has_model, 20)
            model = b.ledger.profiles()[a.peer_id].models[0]
            assert model.weights_hash and model.architecture
            peers = (await api_get(b, "/v1/peers")).json()["peers"]
            assert peers[0]["profile"]["models"] == [model.name]


async def test_bad_requests_get_clear_errors_and_the_engine_keeps_serving(tmp_path, tiny_model):
    async with running_daemon(tmp_path / "a", model=tiny_model) as a:
        await wait_for(lambda: _ready(a), 60)
        unknown = await _post(a, "/v1/chat/completions", {"messages": QUESTION, "adapter": "nope"})
        assert unknown.status_code == 400 and "adapter" in unknown.text
        too_long = await _post(a, "/v1/chat/completions", {"messages": [{"role": "user", "content": "a b " * 2000}]})
        assert too_long.status_code == 400
        malformed = await _post(a, "/v1/chat/completions", {"messages": [{"role": "user"}]})
        assert malformed.status_code == 422
        empty = await _post(a, "/v1/chat/completions", {"messages": []})
        assert empty.status_code == 422
        bad_peer = await _post(a, "/v1/chat/completions", {"messages": QUESTION, "peer": "not-a-peer"})
        assert bad_peer.status_code == 400
        ok = await _post(a, "/v1/chat/completions", {"messages": QUESTION, "max_tokens": 4})
        assert ok.status_code == 200


async def test_adapters_load_use_and_unload_through_the_api(tmp_path, tiny_model):
    from knexa.node.engine import create_random_lora_adapter

    adapter_dir = tmp_path / "lora-a"
    create_random_lora_adapter(tiny_model, adapter_dir, seed=1, b_std=0.3)
    async with running_daemon(tmp_path / "a", model=tiny_model) as a:
        await wait_for(lambda: _ready(a), 60)
        loaded = await _post(a, "/v1/adapters", {"id": "style-a", "path": str(adapter_dir)})
        assert loaded.status_code == 200 and loaded.json()["adapters"] == ["style-a"]
        base = await _post(a, "/v1/chat/completions", {"messages": QUESTION, "max_tokens": 8})
        tuned = await _post(a, "/v1/chat/completions", {"messages": QUESTION, "max_tokens": 8, "adapter": "style-a"})
        assert base.status_code == tuned.status_code == 200
        assert base.json()["choices"][0]["message"]["content"] != tuned.json()["choices"][0]["message"]["content"]
        bad = await _post(a, "/v1/adapters", {"id": "broken", "path": str(tmp_path / "missing")})
        assert bad.status_code == 400
        async with httpx.AsyncClient(base_url=a.api_url, timeout=30) as client:
            gone = await client.delete("/v1/adapters/style-a", headers={"Authorization": f"Bearer {a.api_token}"})
        assert gone.status_code == 200 and gone.json()["adapters"] == []
