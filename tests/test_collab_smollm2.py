"""Collaboration with the shipped SmolLM2 on three real daemons: a mixture-of-agents round answers a factual
question, and every honest answer checked passes verification."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from knexa.node.collab.verify import VerifyPolicy
from knexa.node.engine import ensure_embedded_model
from knexa.node.inference_wire import GenerateParams
from tests.conftest import api_get, p2p_addr, running_daemon, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def smollm2_cache_dir(request: pytest.FixtureRequest) -> Path:
    data_dir = Path(request.config.cache.mkdir("knexa-engine-data"))
    ensure_embedded_model(data_dir / "models", show_progress=False)
    return data_dir


async def test_moa_round_with_smollm2_and_honest_answers_verify(tmp_path, smollm2_cache_dir):
    async with AsyncExitStack() as stack:
        daemons = []
        for i in range(3):
            daemon = await stack.enter_async_context(running_daemon(
                tmp_path / f"n{i}", [p2p_addr(d) for d in daemons], model="embedded", cache_dir=smollm2_cache_dir
            ))
            daemons.append(daemon)
            # one load at a time (see tests/test_collab_mesh.py)
            await wait_for(lambda d=daemon: _state(d) == "ready", 300)
        origin, *peers = daemons
        await wait_for(lambda: all((p := origin.ledger.profiles().get(o.peer_id)) and p.models for o in peers), 60)
        origin.collab.settings.verify = VerifyPolicy(fraction=1.0)
        question = [{"role": "user", "content": "What is the capital of France?"}]
        result = await origin.collab.ask_moa(question, 2, 1, GenerateParams(max_new_tokens=24), 300)
        assert "Paris" in result["text"]
        assert set(result["contributors"]) == {origin.peer_id, *(p.peer_id for p in peers)}
        await wait_for(lambda: origin.collab.verify_counters.checks == 2, 120)
        assert origin.collab.verify_counters.failures == 0
        stats = (await api_get(origin, "/v1/collab")).json()
        assert stats["verification"]["checks"] == 2 and stats["verification"]["failures"] == 0


def _state(daemon) -> str | None:
    return daemon.inference.status().get("state") if daemon.inference is not None else None
