"""Prefix-cache sharing on the shipped SmolLM2 (slow: two daemons load the real model): a 300-token shared
context fetched from a peer gives the same greedy answer as a local prefill."""

from __future__ import annotations

import dataclasses

import pytest

from knexa.node.config import default_data_dir
from knexa.node.engine import GenerationRequest, SamplingParams
from knexa.node.kvshare.service import PATH_PEER
from tests.conftest import p2p_addr, running_daemon, wait_for

pytestmark = pytest.mark.slow

CONTEXT = "Edge devices cooperate over a peer-to-peer mesh and share the caches of what they have read. " * 16


async def test_smollm2_prefix_hit_equals_a_local_prefill(tmp_path):
    cache = default_data_dir()  # the converted model, made once per user
    async with running_daemon(tmp_path / "a", model="embedded", cache_dir=cache) as a:
        await wait_for(lambda: a.inference.status()["state"] == "ready", 600)
        async with running_daemon(tmp_path / "b", [p2p_addr(a)], model="embedded", cache_dir=cache) as b:
            await wait_for(lambda: b.inference.status()["state"] == "ready", 600)
            params = SamplingParams(max_new_tokens=12)
            await a.kvshare.generate(a.kvshare.token_ids(messages=[{"role": "user", "content": CONTEXT + "Who?"}]))
            ids = b.kvshare.token_ids(messages=[{"role": "user", "content": CONTEXT + "What do they share?"}])

            async def found() -> bool:
                return bool((await b.kvshare.find_longest(b.kvshare.model_id(), ids))[1])

            await wait_for(found, 60)
            b.kvshare.settings = dataclasses.replace(b.kvshare.settings, fetch="always")
            result, outcome = await b.kvshare.generate(ids, params)
            assert outcome.path == PATH_PEER and outcome.prefix_tokens >= 256
            local = await b.inference.require_engine().generate(GenerationRequest(prompt_token_ids=ids, params=params))
            assert result.token_ids == local.token_ids
