"""LoRA adapters served per request beside the untouched base weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import trio

from knexa.node.engine import AdapterBusy, AdapterError, Engine, GenerationResult, UnknownAdapter
from tests.engine_helpers import engine_config, greedy, shared_lora_adapters, shared_tiny_model, weights_checksum

PROMPT = "The quick brown fox"


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_tiny_model(tmp_path_factory, "llama")


@pytest.fixture(scope="session")
def tiny_lora_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return shared_lora_adapters(tmp_path_factory)


def base_checksum(engine: Engine) -> float:
    return weights_checksum(engine._worker.model.model)  # the base module tree, wrapped or not


async def test_two_adapters_in_one_batch_differ_and_leave_the_base_unchanged(
    tiny_llama_dir: Path, tiny_lora_dirs: tuple[Path, Path]
) -> None:
    lora_a, lora_b = tiny_lora_dirs
    async with Engine.open(engine_config(tiny_llama_dir)) as engine:
        base_alone = await engine.generate(greedy(PROMPT, max_new_tokens=16))
        checksum = base_checksum(engine)
        assert await engine.load_adapter("a", lora_a) == ["a"]
        assert await engine.load_adapter("b", lora_b) == ["a", "b"]
        assert engine.adapters() == ["a", "b"] and engine.status()["adapters"] == ["a", "b"]

        sequential = {name: await engine.generate(greedy(PROMPT, 16, adapter=name)) for name in ("a", "b", None)}
        together: dict[str | None, GenerationResult] = {}
        most_running = 0

        async def run(name: str | None) -> None:
            nonlocal most_running
            async with engine.stream(greedy(PROMPT, 16, adapter=name)) as events:
                async for event in events:
                    most_running = max(most_running, engine.status()["running"])
                    if isinstance(event, GenerationResult):
                        together[name] = event

        async with trio.open_nursery() as nursery:
            for name in ("a", "b", None):
                nursery.start_soon(run, name)
        assert most_running == 3  # all three decoded in one batch
        assert together["a"].token_ids != together["b"].token_ids
        assert together["a"].token_ids != base_alone.token_ids
        assert together[None].token_ids == base_alone.token_ids
        for name in ("a", "b", None):
            assert together[name].token_ids == sequential[name].token_ids
            assert together[name].adapter == name
        assert base_checksum(engine) == checksum

        assert await engine.unload_adapter("a") == ["b"]
        with pytest.raises(UnknownAdapter):
            await engine.generate(greedy(PROMPT, adapter="a"))
        assert await engine.unload_adapter("b") == []
        after = await engine.generate(greedy(PROMPT, max_new_tokens=16))
        assert after.token_ids == base_alone.token_ids
        assert base_checksum(engine) == checksum


async def test_adapter_errors_are_clear(
    tiny_llama_dir: Path, tiny_lora_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    async with Engine.open(engine_config(tiny_llama_dir)) as engine:
        with pytest.raises(AdapterError, match="not a peft adapter"):
            await engine.load_adapter("x", tmp_path)
        with pytest.raises(AdapterError, match="id"):
            await engine.load_adapter("bad id!", tiny_lora_dirs[0])
        await engine.load_adapter("a", tiny_lora_dirs[0])
        with pytest.raises(AdapterError, match="already"):
            await engine.load_adapter("a", tiny_lora_dirs[1])
        with pytest.raises(UnknownAdapter):
            await engine.unload_adapter("zzz")

        started = trio.Event()

        async def long_run() -> None:
            async with engine.stream(greedy(PROMPT, max_new_tokens=150, adapter="a")) as events:
                async for _ in events:
                    started.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(long_run)
            await started.wait()
            with pytest.raises(AdapterBusy):
                await engine.unload_adapter("a")
        assert (await engine.generate(greedy(PROMPT, adapter="a"))).adapter == "a"


async def test_a_corrupt_or_mismatched_adapter_is_refused_before_it_touches_the_model(
    tiny_llama_dir: Path, tiny_lora_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    truncated, other_rank = tmp_path / "truncated", tmp_path / "other-rank"
    for folder in (truncated, other_rank):
        shutil.copytree(tiny_lora_dirs[0], folder)
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a save cut short
    bad_configs = []
    for i, bad in enumerate(([1], {"peft_type": "NOT_A_METHOD"}, {"r": 8})):
        bad_configs.append(tmp_path / f"config-{i}")
        shutil.copytree(tiny_lora_dirs[0], bad_configs[-1])
        (bad_configs[-1] / "adapter_config.json").write_text(json.dumps(bad))
    config = json.loads((other_rank / "adapter_config.json").read_text())
    (other_rank / "adapter_config.json").write_text(json.dumps({**config, "r": config["r"] // 2}))
    async with Engine.open(engine_config(tiny_llama_dir)) as engine:
        base = await engine.generate(greedy(PROMPT))
        # Once with the bare model, once with peft wrapping it: refused, never a crash and reload.
        for loaded in ([], ["a"]):
            with pytest.raises(AdapterError, match="cannot read"):
                await engine.load_adapter("t", truncated)
            with pytest.raises(AdapterError, match="does not fit"):
                await engine.load_adapter("r", other_rank)
            for folder in bad_configs:
                with pytest.raises(AdapterError, match="not a peft adapter folder"):
                    await engine.load_adapter("c", folder)
            assert engine.status()["state"] == "ready" and engine.adapters() == loaded
            assert not engine._worker._crashes
            adapters = engine._worker.model.adapters
            if loaded:  # nothing of the refused ones was added beside it
                assert set(adapters.model.peft_config) == {"a"}
            else:  # peft never touched the model
                assert not any("lora_" in name for name, _ in adapters.base_model.named_modules())
            assert (await engine.generate(greedy(PROMPT))).token_ids == base.token_ids
            if not loaded:
                await engine.load_adapter("a", tiny_lora_dirs[0])


async def crash_during_a_request(engine: Engine, adapter: str) -> None:
    """A model failure in the middle of a running request; returns once the engine is ready again."""
    started = trio.Event()
    failures: list[Exception] = []

    async def long_run() -> None:
        try:
            async with engine.stream(greedy(PROMPT, max_new_tokens=150, adapter=adapter)) as events:
                async for _ in events:
                    started.set()
        except Exception as exc:
            failures.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(long_run)
        await started.wait()
        engine.inject_fault()
    assert failures and getattr(failures[0], "code", None) == "engine_crashed"
    await engine.wait_ready(30)


async def test_adapters_survive_a_crash_recovery(tiny_llama_dir: Path, tiny_lora_dirs: tuple[Path, Path]) -> None:
    async with Engine.open(engine_config(tiny_llama_dir)) as engine:
        await engine.load_adapter("a", tiny_lora_dirs[0])
        before = await engine.generate(greedy(PROMPT, adapter="a"))
        await crash_during_a_request(engine, "a")
        assert engine.adapters() == ["a"]
        assert (await engine.generate(greedy(PROMPT, adapter="a"))).token_ids == before.token_ids


async def test_a_recovery_takes_an_adapter_whose_folder_broke_from_memory(
    tiny_llama_dir: Path, tiny_lora_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    shutil.copytree(tiny_lora_dirs[0], tmp_path / "a")
    async with Engine.open(engine_config(tiny_llama_dir)) as engine:
        await engine.load_adapter("a", tmp_path / "a")
        await engine.load_adapter("b", tiny_lora_dirs[1])
        before = await engine.generate(greedy(PROMPT, adapter="a"))
        (tmp_path / "a" / "adapter_model.safetensors").write_bytes(b"overwritten")
        await crash_during_a_request(engine, "b")  # the reload reads every adapter's folder again
        assert engine.status()["state"] == "ready" and engine.adapters() == ["a", "b"]
        assert (await engine.generate(greedy(PROMPT, adapter="a"))).token_ids == before.token_ids
