"""The engine end to end on tiny random models: streaming, batching, KV export/import, scoring,
bad input, crashes, overload and loop responsiveness."""

from __future__ import annotations

import gc
import json
import threading
import time
import weakref
from pathlib import Path

import msgpack
import pytest
import trio

from knexa.node.engine import (
    ContextLengthExceeded,
    Engine,
    EngineCrashed,
    EngineDown,
    EngineOverloaded,
    GenerationRequest,
    GenerationResult,
    IncompatibleCache,
    InvalidMessages,
    InvalidRequest,
    SamplingParams,
    TextDelta,
    UnknownAdapter,
)
from tests.engine_helpers import PROMPTS, engine_config, eventually, greedy, shared_tiny_model

ARCHS = ["tiny_llama_dir", "tiny_gpt2_dir"]


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_tiny_model(tmp_path_factory, "llama")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_tiny_model(tmp_path_factory, "gpt2")

@pytest.fixture(params=ARCHS)
def model_dir(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(request.param)


async def test_streaming_deltas_add_up_to_the_final_record(model_dir: Path) -> None:
    async with Engine.open(engine_config(model_dir)) as engine:
        deltas: list[TextDelta] = []
        final = None
        async with engine.stream(greedy("The quick brown fox", max_new_tokens=16)) as events:
            async for event in events:
                if isinstance(event, TextDelta):
                    assert final is None
                    deltas.append(event)
                else:
                    final = event
        assert isinstance(final, GenerationResult)
        assert "".join(d.text for d in deltas) == final.text
        assert tuple(t for d in deltas for t in d.token_ids) == final.token_ids
        assert final.finish_reason in ("length", "stop")
        assert final.prompt_tokens > 0 and final.completion_tokens == len(final.token_ids)
        assert 0 <= final.queue_time_s <= final.time_to_first_token_s <= final.total_time_s
        status = engine.status()
        assert status["state"] == "ready" and status["requests_served"] == 1
        assert status["model"]["num_layers"] == 2 and len(status["model"]["weights_sha256"]) == 64
        msgpack.packb(status)


async def test_greedy_is_deterministic_and_seeded_sampling_repeats(tiny_llama_dir: Path) -> None:
    async with Engine.open(engine_config(tiny_llama_dir)) as engine:
        first = await engine.generate(greedy("The lazy dog", max_new_tokens=20))
        second = await engine.generate(greedy("The lazy dog", max_new_tokens=20))
        assert first.token_ids == second.token_ids and len(first.token_ids) > 0

        def sampled(seed: int) -> GenerationRequest:
            params = SamplingParams(temperature=1.0, top_p=0.95, top_k=50, seed=seed, max_new_tokens=20)
            return GenerationRequest(prompt="The lazy dog", params=params)

        a1, a2, b = [await engine.generate(sampled(s)) for s in (7, 7, 8)]
        assert a1.token_ids == a2.token_ids
        assert a1.token_ids != b.token_ids


async def test_concurrent_requests_batch_and_match_sequential_greedy(model_dir: Path) -> None:
    # Different prompt lengths and output lengths make rows join and leave at different steps.
    requests = [greedy(p, max_new_tokens=6 + 3 * i) for i, p in enumerate(PROMPTS)]
    async with Engine.open(engine_config(model_dir)) as engine:
        sequential = [(await engine.generate(r)).token_ids for r in requests]
        batched: list[tuple[int, ...] | None] = [None] * len(requests)
        most_running = 0

        async def run(index: int) -> None:
            await trio.sleep(0.002 * index)  # stagger: some join a batch that is already decoding
            batched[index] = (await engine.generate(requests[index])).token_ids

        async def watch() -> None:
            nonlocal most_running
            while True:
                most_running = max(most_running, engine.status()["running"])
                await trio.sleep(0.001)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                async with trio.open_nursery() as runners:
                    for index in range(len(requests)):
                        runners.start_soon(run, index)
                nursery.cancel_scope.cancel()
        assert batched == sequential
        assert most_running > 1
        assert engine.status()["requests_served"] == 2 * len(requests)


async def test_stop_strings_cut_the_output(tiny_llama_dir: Path) -> None:
    async with Engine.open(engine_config(tiny_llama_dir)) as engine:
        full = await engine.generate(greedy("The quick brown fox", max_new_tokens=40))
        text = full.text
        # A two-character stop taken from the middle of the greedy output, at its first occurrence.
        cut = next(
            i
            for i in range(len(text) // 4, len(text) - 2)
            if text[i : i + 2].isascii() and text[i : i + 2].isprintable() and text.find(text[i : i + 2]) == i
        )
        stop = text[cut : cut + 2]
        params = SamplingParams(max_new_tokens=40, stop=(stop, "never-seen-stop"))
        stopped = await engine.generate(GenerationRequest(prompt="The quick brown fox", params=params))
        assert stopped.finish_reason == "stop"
        assert stopped.text == text[:cut]
        assert stopped.completion_tokens <= full.completion_tokens


async def test_kv_round_trip_equals_plain_generation(model_dir: Path) -> None:
    async with Engine.open(engine_config(model_dir)) as engine:
        prompt = "What is the capital of France?"
        plain = await engine.generate(greedy(prompt, max_new_tokens=16))
        kv, metadata = await engine.prefill(prompt)
        assert all(t.device.type == "cpu" and t.is_contiguous() for t in kv.values())
        assert len(kv) == 2 * metadata["num_layers"]
        msgpack.packb(metadata)
        request = GenerationRequest(params=SamplingParams(max_new_tokens=16))
        imported = await engine.generate_from_cache(kv, metadata, None, request)
        assert imported.token_ids == plain.token_ids
        assert imported.prompt_tokens == plain.prompt_tokens

        # A continuation on top of an imported cache equals generating from the joined tokens.
        tokens = metadata["token_ids"]
        continuation = [tokens[1], tokens[2], tokens[3]]
        joined = await engine.generate(greedy(tokens + continuation, max_new_tokens=10))
        continued = await engine.generate_from_cache(
            kv, metadata, continuation, GenerationRequest(params=SamplingParams(max_new_tokens=10))
        )
        assert continued.token_ids == joined.token_ids


async def test_score_argmax_reproduces_greedy_output(model_dir: Path) -> None:
    async with Engine.open(engine_config(model_dir)) as engine:
        prompt = "Peers exchange caches"
        output = await engine.generate(greedy(prompt, max_new_tokens=12))
        kv, metadata = await engine.prefill(prompt)
        scored = await engine.score(metadata["token_ids"], list(output.token_ids))
        assert scored.argmax_token_ids == output.token_ids
        assert scored.token_ids == output.token_ids
        assert scored.prompt_tokens == len(metadata["token_ids"])
        for logprob, best in zip(scored.logprobs, scored.argmax_logprobs, strict=True):
            assert logprob <= 0 and logprob == pytest.approx(best, abs=1e-5)
        text_scored = await engine.score(prompt, list(output.token_ids))
        assert text_scored.argmax_token_ids == output.token_ids


async def test_bad_input_gets_clear_errors_and_the_engine_keeps_serving(
    tiny_llama_dir: Path, tiny_gpt2_dir: Path
) -> None:
    async with Engine.open(engine_config(tiny_llama_dir)) as engine, Engine.open(
        engine_config(tiny_gpt2_dir)
    ) as other:
        reference = await engine.generate(greedy("hello world"))
        with pytest.raises(UnknownAdapter) as info:
            await engine.generate(greedy("hello world", adapter="nope"))
        assert info.value.code == "unknown_adapter" and "nope" in info.value.message
        with pytest.raises(ContextLengthExceeded, match="context"):
            await engine.generate(greedy("hello " * 200, max_new_tokens=100))
        with pytest.raises(ContextLengthExceeded):
            await engine.prefill(list(range(300)))
        with pytest.raises(InvalidMessages):
            await engine.generate(GenerationRequest(messages=[{"role": "user", "text": "hi"}]))
        with pytest.raises(InvalidMessages):
            await engine.prefill(messages=[{"role": 1, "content": "hi"}])
        with pytest.raises(InvalidRequest):
            await engine.generate(GenerationRequest(prompt="x", params=SamplingParams(temperature=-1)))
        with pytest.raises(InvalidRequest, match="vocabulary"):
            await engine.generate(greedy([1, 2, 10_000]))

        foreign_kv, foreign_meta = await other.prefill("hello world")
        with pytest.raises(IncompatibleCache, match="another model"):
            await engine.generate_from_cache(foreign_kv, foreign_meta)
        kv, metadata = await engine.prefill("hello world")
        truncated = dict(kv, **{"layers.1.values": kv["layers.1.values"][:, :, :-1].contiguous()})
        with pytest.raises(IncompatibleCache, match="shape"):
            await engine.generate_from_cache(truncated, metadata)
        with pytest.raises(IncompatibleCache, match="dtype"):
            await engine.generate_from_cache(dict(kv, **{"layers.0.keys": kv["layers.0.keys"].half()}), metadata)
        with pytest.raises(IncompatibleCache, match="layers"):
            await engine.generate_from_cache(kv, dict(metadata, num_layers=3))

        again = await engine.generate(greedy("hello world"))
        assert again.token_ids == reference.token_ids
        assert engine.status()["state"] == "ready"


@pytest.mark.parametrize("out_of_memory", [False, True], ids=["crash", "oom"])
async def test_a_crash_mid_batch_fails_in_flight_requests_and_the_engine_recovers(
    tiny_llama_dir: Path, out_of_memory: bool
) -> None:
    async with Engine.open(engine_config(tiny_llama_dir)) as engine:
        reference = await engine.generate(greedy("The lazy dog", max_new_tokens=30))
        outcomes: list[BaseException | GenerationResult] = []
        first_tokens = trio.Semaphore(0)

        async def run(prompt: str) -> None:
            try:
                async with engine.stream(greedy(prompt, max_new_tokens=200)) as events:
                    async for event in events:
                        if isinstance(event, TextDelta) and event.token_ids:
                            first_tokens.release()
                        if isinstance(event, GenerationResult):
                            outcomes.append(event)
            except EngineCrashed as exc:
                outcomes.append(exc)

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for prompt in PROMPTS[:3]:
                    nursery.start_soon(run, prompt)
                for _ in range(3):
                    await first_tokens.acquire()
                engine.inject_fault("simulated kernel failure", out_of_memory=out_of_memory)
        assert len(outcomes) == 3
        assert all(isinstance(o, EngineCrashed) and "simulated kernel failure" in o.message for o in outcomes)
        assert all(("out of memory" in o.message) == out_of_memory for o in outcomes)
        await engine.wait_ready(30)
        assert engine.status()["requests_failed"] == 3
        after = await engine.generate(greedy("The lazy dog", max_new_tokens=30))
        assert after.token_ids == reference.token_ids


async def _one_running_one_queued(engine: Engine, nursery: trio.Nursery, max_new_tokens: int) -> None:
    """Fill the engine's only batch row with a long generation and queue one more behind it."""
    started = trio.Event()

    async def long_run() -> None:
        async with engine.stream(greedy("hello world", max_new_tokens=max_new_tokens)) as events:
            async for _ in events:
                started.set()

    nursery.start_soon(long_run)
    await started.wait()
    nursery.start_soon(engine.generate, greedy("queued", max_new_tokens=2))
    await eventually(lambda: engine.status()["queue_length"] == 1)


async def test_a_full_queue_raises_overloaded_at_once(tiny_llama_dir: Path) -> None:
    async with Engine.open(engine_config(tiny_llama_dir, max_batch=1, max_queue=1)) as engine:
        async with trio.open_nursery() as nursery:
            await _one_running_one_queued(engine, nursery, 120)
            assert engine.status()["queue_length"] == 1
            before = trio.current_time()
            with pytest.raises(EngineOverloaded) as info:
                await engine.generate(greedy("one too many"))
            assert info.value.code == "overloaded"
            assert trio.current_time() - before < 0.1


async def test_one_shot_work_passes_generations_waiting_for_a_batch_row(tiny_llama_dir: Path) -> None:
    async with Engine.open(engine_config(tiny_llama_dir, max_batch=1, max_queue=4)) as engine:
        async with trio.open_nursery() as nursery:
            await _one_running_one_queued(engine, nursery, 240)
            scored = await engine.score("hello", "world")
            assert len(scored.logprobs) == len(scored.token_ids) > 0
            assert engine.status()["running"] == 1 and engine.status()["queue_length"] == 1


async def test_leaving_a_stream_early_cancels_the_request(tiny_llama_dir: Path) -> None:
    async with Engine.open(engine_config(tiny_llama_dir)) as engine:
        async with engine.stream(greedy("hello world", max_new_tokens=200)) as events:
            async for event in events:
                if event.token_ids:
                    break
        await eventually(lambda: engine.status()["running"] == 0)
        result = await engine.generate(greedy("hello world", max_new_tokens=3))
        assert result.completion_tokens <= 3


async def test_the_trio_loop_stays_responsive_under_load(tiny_llama_dir: Path) -> None:
    async with Engine.open(engine_config(tiny_llama_dir)) as engine:
        lags: list[float] = []
        done = trio.Event()

        async def ticker() -> None:
            while not done.is_set():
                before = time.perf_counter()
                await trio.sleep(0.01)
                lags.append(time.perf_counter() - before - 0.01)

        async def load() -> None:
            async with trio.open_nursery() as nursery:
                for prompt in PROMPTS[:4]:
                    nursery.start_soon(engine.generate, greedy(prompt, max_new_tokens=150))
            done.set()

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ticker)
                nursery.start_soon(load)
        assert len(lags) > 5
        assert max(lags) < 0.1, f"trio loop lagged {max(lags):.3f}s"


async def test_a_model_that_cannot_load_reports_down(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(EngineDown, match="load"):
        async with Engine.open(engine_config(tmp_path)):
            pass
    async with Engine.open(engine_config(tmp_path), wait_ready=False) as engine:
        assert await engine.wait_settled(30) == "down"
        status = engine.status()
        assert status["state"] == "down" and "load" in status["reason"]
        with pytest.raises(EngineDown):
            await engine.generate(greedy("hi"))


async def test_the_worker_thread_is_joined_on_exit(tiny_llama_dir: Path) -> None:
    before = {t.ident for t in threading.enumerate()}
    async with Engine.open(engine_config(tiny_llama_dir)) as engine:
        assert any(t.name == "knexa-engine" for t in threading.enumerate())
        await engine.generate(greedy("hi", max_new_tokens=2))
    assert not [t for t in threading.enumerate() if t.name == "knexa-engine" and t.ident not in before]


async def test_a_closed_engine_lets_go_of_its_model_while_the_engine_object_lives(tiny_llama_dir: Path) -> None:
    # A daemon restarted in place leaves its old objects to the garbage collector, which may take its time:
    # the old model must not wait for it beside the new one.
    async with Engine.open(engine_config(tiny_llama_dir)) as engine:
        await engine.generate(greedy("hi", max_new_tokens=2))
        model = weakref.ref(engine._worker.model.model)
        engine.tokenizer()  # the trio side's copy holds the model's state too
    gc.collect()
    assert model() is None
    assert engine.status()["model"] is None and engine.adapters() == []


async def test_auto_dtype_is_measured_once_and_remembered(tiny_llama_dir: Path, tmp_path: Path) -> None:
    config = engine_config(tiny_llama_dir, dtype="auto", data_dir=tmp_path)
    async with Engine.open(config) as engine:
        status = engine.status()
        assert status["device"] == "cpu" and status["dtype"] in ("float32", "bfloat16")
        assert (await engine.generate(greedy("hi", max_new_tokens=3))).completion_tokens >= 1
    remembered = json.loads((tmp_path / "models" / "cpu-dtype-choices.json").read_text())
    assert list(remembered.values()) == [status["dtype"]]
    async with Engine.open(config) as engine:
        assert engine.status()["dtype"] == status["dtype"]
