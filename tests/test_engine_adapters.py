"""LoRA adapters served per request beside the untouched base weights."""

from __future__ import annotations

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


async def test_adapters_survive_a_crash_recovery(tiny_llama_dir: Path, tiny_lora_dirs: tuple[Path, Path]) -> None:
    async with Engine.open(engine_config(tiny_llama_dir)) as engine:
        await engine.load_adapter("a", tiny_lora_dirs[0])
        before = await engine.generate(greedy(PROMPT, adapter="a"))
        started = trio.Event()
        failures: list[Exception] = []

        async def long_run() -> None:
            try:
                async with engine.stream(greedy(PROMPT, max_new_tokens=150, adapter="a")) as events:
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
        assert engine.adapters() == ["a"]
        assert (await engine.generate(greedy(PROMPT, adapter="a"))).token_ids == before.token_ids
