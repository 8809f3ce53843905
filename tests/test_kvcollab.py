"""KV collaboration between real daemons of different models (a tiny Llama receiving from a tiny GPT-2 with
another tokenizer): a fused generation over RPC, the text-hint path without a fuser, the API's path report,
and private mode, where the sharer must never receive the raw query."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch
from libp2p.peer.id import ID as PeerID

from knexa.node.engine import GenerationRequest, SamplingParams
from knexa.node.engine.identity import weights_sha256
from knexa.node.kvshare.fuser import CacheFuser, FuserSpec, save_fuser
from tests.conftest import p2p_addr, running_daemon, wait_for
from tests.engine_helpers import build_tiny_model, build_tokenizer

QUERY = "What is the capital of France?"


def build_sharer(folder) -> str:
    """A 2-layer GPT-2 with its own 400-token tokenizer (the receiver's has 320)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    build_tokenizer(folder, vocab_size=400)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(3)
    config = GPT2Config(n_embd=48, n_layer=2, n_head=3, vocab_size=len(tokenizer), n_positions=256,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        initializer_range=0.2)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("kvcollab")
    return str(build_tiny_model(root / "receiver")), build_sharer(root / "sharer")


def install_fuser(receiver: str, sharer: str, cache_dir) -> str:
    """An untrained fuser (it returns the receiver's cache unchanged) for sharer -> receiver."""
    from transformers import AutoConfig

    spec = FuserSpec.for_models(
        AutoConfig.from_pretrained(sharer), AutoConfig.from_pretrained(receiver), hidden=32,
        sharer_model=weights_sha256(Path(sharer)), receiver_model=weights_sha256(Path(receiver)),
    )
    save_fuser(CacheFuser(spec), cache_dir / "fusers", "tiny-gpt2-to-llama")
    return "tiny-gpt2-to-llama"


async def _ready(daemon) -> bool:
    return daemon.inference.status()["state"] == "ready"


async def _ask(daemon, body: dict) -> dict:
    async with httpx.AsyncClient(base_url=daemon.api_url, timeout=120) as client:
        response = await client.post("/v1/kv/ask", json=body, headers={"Authorization": f"Bearer {daemon.api_token}"})
    assert response.status_code == 200, response.text
    return response.json()


def _sees_model(receiver, sharer) -> bool:
    profile = receiver.ledger.profiles().get(sharer.peer_id)
    return bool(profile and profile.models)


async def test_fused_generation_over_rpc_and_the_path_reported(tmp_path, models):
    receiver_model, sharer_model = models
    cache = tmp_path / "receiver-cache"
    name = install_fuser(receiver_model, sharer_model, cache)
    async with running_daemon(tmp_path / "r", model=receiver_model, cache_dir=cache) as r:
        async with running_daemon(tmp_path / "s", [p2p_addr(r)], model=sharer_model) as s:
            await wait_for(lambda: _ready(r), 60)
            await wait_for(lambda: _ready(s), 60)
            received = []
            s.kvexchange.on_received = lambda method, text: received.append((method, text))
            params = SamplingParams(max_new_tokens=8)
            result, outcome = await r.kvexchange.fused_generate(QUERY, PeerID.from_base58(s.peer_id), name, params)
            assert outcome.path == "fused" and received == [("kv.share", QUERY)]
            # An untrained fuser leaves the receiver's cache as it is: the output is the receiver's own on
            # (shared text, then its chat prompt), which checks the whole path's plumbing token for token.
            tokens = r.kvshare.token_ids(prompt=QUERY) + r.kvexchange._prompt_ids(QUERY)
            local = await r.inference.require_engine().generate(GenerationRequest(prompt_token_ids=tokens,
                                                                                  params=params))
            assert result.token_ids == local.token_ids

            await wait_for(lambda: _sees_model(r, s), 30)
            answer = await _ask(r, {"query": QUERY, "max_tokens": 8})
            assert answer["path"] == "fused" and answer["peer"] == s.peer_id and answer["details"]["fuser"] == name
            assert answer["attempts"] and answer["attempts"][0].startswith("prefix:")


async def test_text_hint_without_a_fuser_and_private_mode_keeps_the_query_home(tmp_path, models):
    receiver_model, sharer_model = models
    async with running_daemon(tmp_path / "r", model=receiver_model) as r:
        async with running_daemon(tmp_path / "s", [p2p_addr(r)], model=sharer_model) as s:
            await wait_for(lambda: _ready(r), 60)
            await wait_for(lambda: _ready(s), 60)
            await wait_for(lambda: _sees_model(r, s), 30)
            received = []
            s.kvexchange.on_received = lambda method, text: received.append((method, text))
            answer = await _ask(r, {"query": QUERY, "max_tokens": 8})
            assert answer["path"] == "text-hint" and received == [("kv.hint", QUERY)]
            assert answer["details"]["hint"] is not None

            received.clear()
            private = await _ask(r, {"query": QUERY, "max_tokens": 8, "private": True})
            sent = private["details"].get("shared_text")
            assert private["path"] == "text-hint" and sent and received == [("kv.hint", sent)]
            assert all(QUERY.lower() not in text.lower() for _, text in received)
            assert r.kvshare.stats()["paths"].get("local", 0) == 1  # the private ask made no prefix lookup
