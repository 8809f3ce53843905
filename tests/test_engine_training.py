"""Shadow adapters trained inside the serving engine (CoLLM), on a tiny random model: training never
interrupts serving, never touches the live adapter or the base, and replaces the live adapter only when
promoted."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import trio

from knexa.node.engine import AdapterBusy, Engine, InvalidRequest, TrainExample, TrainSpec
from knexa.node.engine.training import TrainingPolicy, encode_example
from tests.engine_helpers import engine_config, greedy, shared_tiny_model, weights_checksum

ANSWER = "Paris is the capital of France."
EXAMPLES = [TrainExample([{"role": "user", "content": "What is the capital of France?"}], ANSWER)]


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_tiny_model(tmp_path_factory, "llama")


def lora_checksum(engine: Engine, adapter_id: str) -> float:
    tensors = engine._worker.model.adapters.parameters_of(adapter_id)
    with torch.no_grad():
        return float(sum(t.double().abs().sum() for t in tensors.values()))


def spec(steps: int, **fields: object) -> TrainSpec:
    settings: dict = dict(live_id="live", shadow_id="shadow", examples=EXAMPLES, steps=steps, lr=5e-3, batch_size=2)
    settings.update(fields)
    return TrainSpec(**settings)


def test_policy_yields_to_waiting_requests_and_to_the_latency_target() -> None:
    policy = TrainingPolicy(latency_target_s=0.5)
    assert policy.may_step(queued=0, running_rows=0, decode_step_s=0.0, train_step_s=2.0)  # idle: train
    assert not policy.may_step(queued=1, running_rows=0, decode_step_s=0.0, train_step_s=0.0)
    assert policy.may_step(queued=0, running_rows=3, decode_step_s=0.1, train_step_s=0.3)
    assert not policy.may_step(queued=0, running_rows=3, decode_step_s=0.1, train_step_s=0.5)


def test_loss_falls_on_the_answer_only() -> None:
    ids, labels = encode_example([1, 2, 3], [7, 8], eos_id=9, max_tokens=64)
    assert ids == [1, 2, 3, 7, 8, 9] and labels == [-100, -100, -100, 7, 8, 9]
    ids, labels = encode_example(list(range(100)), [7, 8], eos_id=9, max_tokens=8)
    assert len(ids) == 8 and ids[-3:] == [7, 8, 9] and labels[:5] == [-100] * 5


async def test_shadow_learns_while_live_and_base_stay_bit_identical(tiny_llama_dir: Path) -> None:
    async with Engine.open(engine_config(tiny_llama_dir)) as engine:
        await engine.ensure_adapter("live", seed=1)
        await engine.ensure_adapter("live")  # already there: nothing happens
        base, live = weights_checksum(engine._worker.model.model), lora_checksum(engine, "live")
        before = await engine.generate(greedy("What is the capital of France?", 16, adapter="live"))
        seen: list[tuple[int, float]] = []
        report = await engine.train_shadow(spec(30), progress=lambda step, loss: seen.append((step, loss)))
        assert report.steps == 30 and len(seen) == 30
        assert report.last_loss < report.first_loss / 2
        assert weights_checksum(engine._worker.model.model) == base
        assert lora_checksum(engine, "live") == live
        assert (await engine.generate(greedy("What is the capital of France?", 16, adapter="live"))).token_ids \
            == before.token_ids
        assert sorted(engine.adapters()) == ["live", "shadow"]


async def test_requests_are_answered_while_the_shadow_trains(tiny_llama_dir: Path) -> None:
    """Structural, not timed: requests sent after training started finish while it still has steps left."""
    async with Engine.open(engine_config(tiny_llama_dir)) as engine:
        await engine.ensure_adapter("live", seed=1)
        finished_with_steps_left: list[int] = []
        progress: list[int] = []
        async with trio.open_nursery() as nursery:
            done = trio.Event()

            async def train() -> None:
                await engine.train_shadow(spec(400), progress=lambda step, loss: progress.append(step))
                done.set()

            nursery.start_soon(train)
            with trio.fail_after(60):
                while not progress:  # noqa: ASYNC110 - the worker reports progress through the loop
                    await trio.sleep(0.01)
            for prompt in ("The quick brown fox", "Peers exchange caches"):
                result = await engine.generate(greedy(prompt, 8, adapter="live"))
                assert result.token_ids
                status = engine.status()["training"]
                finished_with_steps_left.append(400 - status["steps_done"] if status else 0)
            await done.wait()
        assert all(left > 0 for left in finished_with_steps_left), finished_with_steps_left


async def test_training_yields_while_requests_queue(tiny_llama_dir: Path) -> None:
    async with Engine.open(engine_config(tiny_llama_dir, max_batch=1)) as engine:
        await engine.ensure_adapter("live", seed=1)
        reports = []
        async with trio.open_nursery() as nursery:
            async def train() -> None:
                reports.append(await engine.train_shadow(spec(60, latency_target_s=10.0)))

            nursery.start_soon(train)
            await trio.sleep(0.05)
            for i in range(6):  # one batch row: the others wait in the queue, and training gives way
                nursery.start_soon(engine.generate, greedy(f"The quick brown fox {i}", 24, adapter="live"))
        assert reports[0].steps == 60 and reports[0].yielded_rounds > 0


async def test_promote_replaces_live_atomically_and_save_reload_reproduces(tiny_llama_dir: Path,
                                                                           tmp_path: Path) -> None:
    prompt = "What is the capital of France?"
    async with Engine.open(engine_config(tiny_llama_dir)) as engine:
        await engine.ensure_adapter("live", seed=1)
        await engine.train_shadow(spec(40))
        shadow_out = await engine.generate(greedy(prompt, 16, adapter="shadow"))
        live_out = await engine.generate(greedy(prompt, 16, adapter="live"))
        assert shadow_out.token_ids != live_out.token_ids
        await engine.promote_shadow("shadow", "live")
        assert (await engine.generate(greedy(prompt, 16, adapter="live"))).token_ids == shadow_out.token_ids
        await engine.save_adapter("live", tmp_path / "live")
        assert (tmp_path / "live" / "adapter_model.safetensors").is_file()
    async with Engine.open(engine_config(tiny_llama_dir)) as engine:
        await engine.load_adapter("restored", tmp_path / "live")
        assert (await engine.generate(greedy(prompt, 16, adapter="restored"))).token_ids == shadow_out.token_ids


async def test_a_cancelled_training_stops_and_leaves_serving_intact(tiny_llama_dir: Path) -> None:
    async with Engine.open(engine_config(tiny_llama_dir)) as engine:
        await engine.ensure_adapter("live", seed=1)
        live = lora_checksum(engine, "live")
        with trio.move_on_after(0.3):
            await engine.train_shadow(spec(100_000))
        with trio.fail_after(30):
            while engine.status()["training"] is not None:  # noqa: ASYNC110 - the worker notices at its next step
                await trio.sleep(0.01)
        assert lora_checksum(engine, "live") == live
        assert (await engine.generate(greedy("The quick brown fox", 8, adapter="live"))).token_ids
        report = await engine.train_shadow(spec(3))  # a new training may start
        assert report.steps == 3


async def test_bad_training_requests_are_refused(tiny_llama_dir: Path) -> None:
    async with Engine.open(engine_config(tiny_llama_dir)) as engine:
        for bad in (spec(0), spec(5, examples=[]), spec(5, shadow_id="live"), spec(5, lr=5.0),
                    spec(5, examples=[TrainExample([{"role": "user", "content": "x"}], "")]),
                    spec(5, examples=[TrainExample([{"role": "user", "content": "x"}], "y", weight=-1)])):
            with pytest.raises(InvalidRequest):
                await engine.train_shadow(bad)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(engine.train_shadow, spec(200))
            await trio.sleep(0.2)
            with pytest.raises(AdapterBusy):
                await engine.train_shadow(spec(5, live_id="x", shadow_id="y"))
            with pytest.raises(AdapterBusy):
                await engine.unload_adapter("shadow")
            nursery.cancel_scope.cancel()
        assert (await engine.generate(greedy("The quick brown fox", 4))).token_ids
