"""Shadow adapters trained inside the serving engine (CoLLM), on a tiny random model: training never
interrupts serving, never touches the live adapter or the base, and replaces the live adapter only when
promoted. The policy and the batch building are pure and tested without a model."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest
import torch
import trio

from knexa.node.engine import (
    AdapterBusy,
    AdapterError,
    Engine,
    EngineCrashed,
    GenerationRequest,
    GenerationResult,
    InvalidRequest,
    SamplingParams,
    TextDelta,
    TrainExample,
    TrainSpec,
    UnknownAdapter,
)
from knexa.node.engine.errors import InvalidMessages
from knexa.node.engine.training import (
    IGNORE,
    TrainingPolicy,
    TrainingRun,
    answer_positions,
    collate,
    encode_example,
    weighted_loss,
)
from tests.engine_helpers import engine_config, eventually, greedy, shared_tiny_model

QUESTION = "What is the capital of France?"
ANSWER = "Paris is the capital of France."
EXAMPLES = [TrainExample([{"role": "user", "content": QUESTION}], ANSWER)]


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_tiny_model(tmp_path_factory, "llama")


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """A hash of the exact bytes of named tensors: equal digests mean bit-identical weights."""
    sha = hashlib.sha256()
    for name in sorted(tensors):
        sha.update(name.encode())
        sha.update(tensors[name].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


def base_digest(engine: Engine) -> str:
    model = engine._worker.model.adapters.model
    return digest({name: p for name, p in model.named_parameters() if "lora_" not in name})


def lora_digest(engine: Engine, adapter_id: str) -> str:
    return digest(engine._worker.model.adapters.parameters_of(adapter_id))


def spec(steps: int, **fields: object) -> TrainSpec:
    settings: dict = dict(live_id="live", shadow_id="shadow", examples=EXAMPLES, steps=steps, lr=5e-3, batch_size=2)
    settings.update(fields)
    return TrainSpec(**settings)


# The fast loop, pure ------------------------------------------------------------------------------------


def test_policy_yields_to_waiting_requests_and_fits_training_in_the_latency_target() -> None:
    policy = TrainingPolicy(latency_target_s=0.5)
    # Idle: the whole rest of the step, however slow.
    assert policy.examples_this_round(queued=0, running_rows=0, decode_step_s=0.0, example_s=9.0, remaining=4) == 4
    # Anything waiting in the queue: yield, even when idle otherwise.
    assert policy.examples_this_round(queued=1, running_rows=0, decode_step_s=0.0, example_s=None, remaining=4) == 0
    assert policy.examples_this_round(queued=2, running_rows=3, decode_step_s=0.01, example_s=0.01, remaining=4) == 0
    # Beside running requests: one example to measure, then what fits next to the decode step.
    assert policy.examples_this_round(queued=0, running_rows=3, decode_step_s=0.1, example_s=None, remaining=4) == 1
    assert policy.examples_this_round(queued=0, running_rows=3, decode_step_s=0.1, example_s=0.15, remaining=4) == 2
    assert policy.examples_this_round(queued=0, running_rows=3, decode_step_s=0.1, example_s=0.01, remaining=3) == 3
    assert policy.examples_this_round(queued=0, running_rows=3, decode_step_s=0.1, example_s=0.5, remaining=4) == 0
    assert policy.examples_this_round(queued=0, running_rows=1, decode_step_s=0.6, example_s=0.01, remaining=4) == 0


def test_policy_owes_training_its_floor_share_when_nothing_fits() -> None:
    policy = TrainingPolicy(latency_target_s=0.5, min_share=0.2)
    # A piece of 0.3 s keeps a 20% share after 1.2 s of waiting; before any piece, the target stands in.
    assert not policy.owed_a_piece(example_s=0.3, since_trained_s=1.1)
    assert policy.owed_a_piece(example_s=0.3, since_trained_s=1.2)
    assert not policy.owed_a_piece(example_s=None, since_trained_s=1.9)
    assert policy.owed_a_piece(example_s=None, since_trained_s=2.0)
    # No floor: training waits for room however long.
    assert not TrainingPolicy(latency_target_s=0.5).owed_a_piece(example_s=0.01, since_trained_s=1e6)


def test_a_step_in_pieces_covers_its_batch_once_and_divides_by_the_whole_weight() -> None:
    encoded = [([1, 2, i], [IGNORE, 2, i], float(i + 1)) for i in range(5)]
    parameter = torch.nn.Parameter(torch.zeros(1))
    run = TrainingRun(spec(3, batch_size=4), encoded, TrainingPolicy(0.5), torch.optim.AdamW([parameter]),
                      [parameter], random.Random(0))
    assert run.remaining_in_step == 4
    first, weight = run.take_piece(1)
    assert not run.piece_done(0.25, 1, 0.2) and run.remaining_in_step == 3 and run.example_s == pytest.approx(0.2)
    rest, same_weight = run.take_piece(10)
    assert run.piece_done(0.5, 3, 0.3) and not run.done
    run.step_done()
    assert len(first + rest) == 4 and len({tuple(ids) for ids, _, _ in first + rest}) == 4
    assert weight == same_weight == sum(w for _, _, w in first + rest)
    assert run.losses == [0.75]
    # Every example comes once per pass over the data before any comes again.
    seen = [ids[-1] for ids, _, _ in first + rest] + [ids[-1] for ids, _, _ in run.take_piece(4)[0]]
    assert sorted(seen[:5]) == [0, 1, 2, 3, 4]


def full_logits_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The loss written the plain way, over every position's logits."""
    per_token = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE, reduction="none"
    ).view(labels.shape[0], -1)
    counted = (labels[:, 1:] != IGNORE).float()
    per_row = (per_token * counted).sum(dim=1) / counted.sum(dim=1).clamp(min=1)
    return (per_row * weights).sum() / weights.sum()


def test_weighted_loss_in_pieces_equals_the_whole_batch_and_weights_scale_rows() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)
    labels = torch.tensor([[IGNORE, IGNORE, 4, 5, 6], [IGNORE, 3, 3, IGNORE, IGNORE], [IGNORE, 1, 2, 3, 4]])
    weights = torch.tensor([1.0, 0.0, 3.0])

    def loss(rows: list[int], total: float | None = None) -> torch.Tensor:
        return weighted_loss(logits[rows][answer_positions(labels[rows])], labels[rows], weights[rows], total)

    whole = loss([0, 1, 2])
    # Logits only at the answer positions give the loss computed over every position.
    assert float(whole) == pytest.approx(float(full_logits_loss(logits, labels, weights)))
    pieces = sum(loss([i], 4.0) for i in range(3))
    assert float(pieces) == pytest.approx(float(whole))
    # A weight-0 row adds nothing; the rest is the weighted mean of row means.
    assert float(loss([0, 2])) == pytest.approx(float(whole))


def test_loss_falls_on_the_answer_and_its_end_only_and_long_prompts_are_cut_from_the_left() -> None:
    ids, labels = encode_example([1, 2, 3], [7, 8], eos_id=9, max_tokens=64)
    assert ids == [1, 2, 3, 7, 8, 9] and labels == [-100, -100, -100, 7, 8, 9]
    ids, labels = encode_example(list(range(100)), [7, 8], eos_id=9, max_tokens=8)
    assert len(ids) == 8 and ids[-3:] == [7, 8, 9] and labels[:5] == [-100] * 5 and ids[0] == 95
    ids, labels = encode_example([1, 2], list(range(50)), eos_id=None, max_tokens=10)
    assert len(ids) == 10 and ids[0] == 2 and labels[0] == IGNORE and labels[1:] == list(range(9))
    batch_ids, mask, batch_labels, weights = collate([([1, 2, 3], [IGNORE, 2, 3], 1.0), ([4], [4], 0.5)], 0,
                                                     torch.device("cpu"))
    assert batch_ids.tolist() == [[1, 2, 3], [4, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch_labels.tolist() == [[IGNORE, 2, 3], [4, IGNORE, IGNORE]] and weights.tolist() == [1.0, 0.5]


# In the engine ------------------------------------------------------------------------------------------


async def test_shadow_learns_while_live_and_base_stay_bit_identical(tiny_llama_dir: Path) -> None:
    async with Engine.open(engine_config(tiny_llama_dir)) as engine:
        await engine.ensure_adapter("live", seed=1)
        await engine.ensure_adapter("live", seed=2)  # already there: nothing happens
        base, live = base_digest(engine), lora_digest(engine, "live")
        before = await engine.generate(greedy(QUESTION, 16, adapter="live"))
        seen: list[tuple[int, float]] = []
        report = await engine.train_shadow(spec(30), progress=lambda step, loss: seen.append((step, loss)))
        assert report.steps == 30 and [step for step, _ in seen] == list(range(1, 31))
        assert report.last_loss < report.first_loss / 2 and report.yielded_rounds == 0
        assert base_digest(engine) == base and lora_digest(engine, "live") == live
        assert lora_digest(engine, "shadow") != live
        assert (await engine.generate(greedy(QUESTION, 16, adapter="live"))).token_ids == before.token_ids
        assert sorted(engine.adapters()) == ["live", "shadow"]
        status = engine.status()
        assert status["training"] is None and status["last_training"]["outcome"] == "done"
        assert status["last_training"]["steps_done"] == 30
        # A second training starts again from live's weights, not from where the shadow got to.
        again = await engine.train_shadow(spec(1))
        assert again.first_loss == pytest.approx(report.first_loss, rel=1e-4)


async def test_answer_loss_is_the_loss_training_starts_from_and_falls_as_the_shadow_learns(
        tiny_llama_dir: Path) -> None:
    other = TrainExample([{"role": "user", "content": "Name a colour."}], "Blue, like the sky at noon.")
    async with Engine.open(engine_config(tiny_llama_dir)) as engine:
        await engine.ensure_adapter("live", seed=1)
        [live_loss] = await engine.answer_loss(EXAMPLES, adapter="live")
        report = await engine.train_shadow(spec(1, batch_size=1))
        assert live_loss == pytest.approx(report.first_loss, rel=1e-4)  # encoded as training encodes it
        # Rows padded into one batch score as they do alone; more than one batch of examples keeps its order.
        many = [EXAMPLES[0], other] * 5
        together = await engine.answer_loss(many, adapter="live")
        alone = [(await engine.answer_loss([e], adapter="live"))[0] for e in (EXAMPLES[0], other)]
        assert together == pytest.approx(alone * 5, rel=1e-4)
        assert (await engine.answer_loss([])) == []
        await engine.train_shadow(spec(30))
        [shadow_loss] = await engine.answer_loss(EXAMPLES, adapter="shadow")
        assert shadow_loss < live_loss / 2
        with pytest.raises(UnknownAdapter):
            await engine.answer_loss(EXAMPLES, adapter="nope")
        for bad_examples, bad_tokens in (([TrainExample([{"role": "user", "content": "x"}], "")], 256),
                                         ([("x", "y")], 256), (EXAMPLES, 4)):
            with pytest.raises(InvalidRequest):
                await engine.answer_loss(bad_examples, max_tokens=bad_tokens)  # type: ignore[arg-type]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(engine.train_shadow, spec(100_000))
            await eventually(lambda: engine.status()["training"] is not None)
            with pytest.raises(AdapterBusy):  # its weights move between decode steps
                await engine.answer_loss(EXAMPLES, adapter="shadow")
            assert len(await engine.answer_loss(EXAMPLES, adapter="live")) == 1  # live serves meanwhile
            nursery.cancel_scope.cancel()


async def test_a_teacher_answers_within_its_models_context(tiny_llama_dir: Path) -> None:
    """The brief's 256 answer tokens do not fit beside a prompt in this model's 256-token context: each
    answer gets the room left (before, every request failed and the teacher sent nothing)."""
    from knexa.node.learn import agent

    async with Engine.open(engine_config(tiny_llama_dir)) as engine:
        room = engine.room_for_answer(agent.user_turn(QUESTION))
        assert 0 < room < 256
        too_long = "word " * 400  # fills the context alone: no answer
        assert engine.room_for_answer(agent.user_turn(too_long)) <= 0
        answers = await agent.teacher_answers(engine, None, [QUESTION, too_long, ANSWER], max_tokens=256, seed=1)
        assert len(answers) == 3 and answers[1] == ""
        assert engine.status()["requests_failed"] == 0


async def test_a_voting_teacher_samples_family_prompts_and_sends_only_agreed_answers(tiny_llama_dir: Path) -> None:
    from knexa.node.learn import agent, tasks

    family = tasks.transfer_set(4, seed=3)
    prompts = [*family, QUESTION]
    async with Engine.open(engine_config(tiny_llama_dir)) as engine:
        answers = await agent.teacher_answers(engine, None, prompts, max_tokens=6, seed=5, votes=3)
        # Three samples of each family prompt, one of the prompt of no known category.
        assert engine.status()["requests_served"] == 3 * len(family) + 1
        once = await agent.teacher_answers(engine, None, prompts, max_tokens=6, seed=5)
        samples = [await agent.teacher_answers(engine, None, prompts, max_tokens=6,
                                               seed=5 + vote * agent.VOTE_SEED_STRIDE) for vote in range(3)]
    assert len(answers) == len(prompts)
    assert answers[-1] == once[-1]  # no vote where nothing can be compared
    for i in range(len(family)):
        agreed = tasks.majority([s[i] for s in samples])
        assert answers[i] == (agreed or "")
    with pytest.raises(ValueError):
        await agent.teacher_answers(engine, None, prompts, max_tokens=6, seed=5, votes=0)


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
            await eventually(lambda: bool(progress), timeout_s=60)
            for prompt in ("The quick brown fox", "Peers exchange caches"):
                result = await engine.generate(greedy(prompt, 8, adapter="live"))
                assert result.token_ids
                status = engine.status()["training"]
                finished_with_steps_left.append(400 - status["steps_done"] if status else 0)
            with pytest.raises(AdapterBusy):  # its weights move between decode steps
                await engine.generate(greedy("The quick brown fox", 8, adapter="shadow"))
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
            await eventually(lambda: engine.status()["training"] is not None)
            for i in range(6):  # one batch row: the others wait in the queue, and training gives way
                nursery.start_soon(engine.generate, greedy(f"The quick brown fox {i}", 24, adapter="live"))
        assert reports[0].steps == 60 and reports[0].yielded_rounds > 0


async def test_promote_replaces_live_atomically_and_save_reload_reproduces(tiny_llama_dir: Path,
                                                                           tmp_path: Path) -> None:
    async with Engine.open(engine_config(tiny_llama_dir)) as engine:
        await engine.ensure_adapter("live", seed=1)
        await engine.train_shadow(spec(40))
        shadow_out = await engine.generate(greedy(QUESTION, 16, adapter="shadow"))
        live_out = await engine.generate(greedy(QUESTION, 16, adapter="live"))
        assert shadow_out.token_ids != live_out.token_ids
        shadow = lora_digest(engine, "shadow")
        await engine.promote_shadow("shadow", "live")
        assert lora_digest(engine, "live") == shadow == lora_digest(engine, "shadow")
        assert (await engine.generate(greedy(QUESTION, 16, adapter="live"))).token_ids == shadow_out.token_ids
        await engine.save_adapter("live", tmp_path / "live")
        assert (tmp_path / "live" / "adapter_model.safetensors").is_file()
        assert sorted(p.name for p in (tmp_path / "live").iterdir()) == ["adapter_config.json",
                                                                         "adapter_model.safetensors"]
    async with Engine.open(engine_config(tiny_llama_dir)) as engine:
        await engine.load_adapter("restored", tmp_path / "live")
        assert (await engine.generate(greedy(QUESTION, 16, adapter="restored"))).token_ids == shadow_out.token_ids


async def test_a_request_decoding_during_promotion_finishes_on_the_weights_it_started_with(
    tiny_llama_dir: Path,
) -> None:
    prompt = "The quick brown fox"
    async with Engine.open(engine_config(tiny_llama_dir)) as engine:
        await engine.ensure_adapter("live", seed=1)
        await engine.train_shadow(spec(40))
        old = await engine.generate(greedy(prompt, 200, adapter="live"))
        new = await engine.generate(greedy(prompt, 200, adapter="shadow"))
        assert old.token_ids != new.token_ids and len(old.token_ids) > 20
        async with engine.stream(greedy(prompt, 200, adapter="live")) as events:
            async for event in events:
                if isinstance(event, TextDelta):
                    await engine.promote_shadow("shadow", "live")
                    break
            # The promotion found the request running: it now decodes with a hidden copy of the old weights.
            assert engine._worker.model.adapters.retired
            result = [event async for event in events if isinstance(event, GenerationResult)][0]
        assert result.token_ids == old.token_ids and result.adapter == "live"
        assert (await engine.generate(greedy(prompt, 200, adapter="live"))).token_ids == new.token_ids
        assert not engine._worker.model.adapters.retired and sorted(engine.adapters()) == ["live", "shadow"]


async def test_a_cancelled_training_stops_and_leaves_serving_intact(tiny_llama_dir: Path) -> None:
    async with Engine.open(engine_config(tiny_llama_dir)) as engine:
        await engine.ensure_adapter("live", seed=1)
        base, live = base_digest(engine), lora_digest(engine, "live")
        with trio.move_on_after(0.3):
            await engine.train_shadow(spec(100_000))
        await eventually(lambda: engine.status()["training"] is None)  # the worker notices at its next round
        assert engine.status()["last_training"]["outcome"] == "cancelled"
        assert lora_digest(engine, "live") == live and base_digest(engine) == base
        assert (await engine.generate(greedy("The quick brown fox", 8, adapter="live"))).token_ids
        report = await engine.train_shadow(spec(3))  # a new training may start
        assert report.steps == 3


async def test_a_failing_training_step_fails_the_training_only(tiny_llama_dir: Path) -> None:
    async with Engine.open(engine_config(tiny_llama_dir)) as engine:
        await engine.ensure_adapter("live", seed=1)
        base, live = base_digest(engine), lora_digest(engine, "live")
        reference = await engine.generate(greedy("The quick brown fox", 40, adapter="live"))
        results: list[GenerationResult] = []
        async with trio.open_nursery() as nursery:
            async def serve() -> None:
                results.append(await engine.generate(greedy("The quick brown fox", 40, adapter="live")))

            progress: list[int] = []
            nursery.start_soon(serve)
            engine.inject_fault("simulated failure in backward", during="training")
            with pytest.raises(AdapterError, match="simulated failure in backward"):
                await engine.train_shadow(spec(1000), progress=lambda step, loss: progress.append(step))
        assert results[0].token_ids == reference.token_ids
        status = engine.status()
        assert status["state"] == "ready" and status["requests_failed"] == 0
        assert status["last_training"]["outcome"] == "failed"
        assert lora_digest(engine, "live") == live and base_digest(engine) == base
        assert (await engine.train_shadow(spec(2))).steps == 2


async def test_a_model_crash_during_training_keeps_the_adapters_made_in_memory(tiny_llama_dir: Path) -> None:
    async with Engine.open(engine_config(tiny_llama_dir)) as engine:
        await engine.ensure_adapter("live", seed=1)
        await engine.train_shadow(spec(20))
        await engine.promote_shadow("shadow", "live")
        live = lora_digest(engine, "live")
        reference = await engine.generate(greedy(QUESTION, 16, adapter="live"))
        async with trio.open_nursery() as nursery:
            failures: list[Exception] = []

            async def train() -> None:
                try:
                    await engine.train_shadow(spec(100_000))
                except EngineCrashed as exc:
                    failures.append(exc)

            nursery.start_soon(train)
            await eventually(lambda: engine.status()["training"] is not None)
            engine.inject_fault("simulated kernel failure")
            with pytest.raises(EngineCrashed):
                await engine.generate(greedy("The quick brown fox", 8, adapter="live"))
        assert len(failures) == 1
        await engine.wait_ready(60)
        # The reload brought back the promoted live adapter and the shadow, not only adapters from folders.
        assert sorted(engine.adapters()) == ["live", "shadow"] and lora_digest(engine, "live") == live
        assert (await engine.generate(greedy(QUESTION, 16, adapter="live"))).token_ids == reference.token_ids
        assert (await engine.train_shadow(spec(2))).steps == 2


async def test_adapters_come_and_go_while_the_shadow_trains(tiny_llama_dir: Path) -> None:
    """peft hands requires_grad to its 'active' adapter when that one is unloaded; training carries on."""
    async with Engine.open(engine_config(tiny_llama_dir)) as engine:
        await engine.ensure_adapter("live", seed=1)
        reports = []
        async with trio.open_nursery() as nursery:
            async def train() -> None:
                reports.append(await engine.train_shadow(spec(150)))

            nursery.start_soon(train)
            await eventually(lambda: engine.status()["training"] is not None)
            await engine.ensure_adapter("other", seed=3)
            await engine.unload_adapter("live")  # peft's active adapter
            assert engine.status()["training"] is not None
            other = lora_digest(engine, "other")
        assert reports[0].steps == 150 and reports[0].last_loss < reports[0].first_loss / 2
        assert lora_digest(engine, "other") == other
        assert sorted(engine.adapters()) == ["other", "shadow"]


async def test_training_under_load_that_never_leaves_room_still_progresses(tiny_llama_dir: Path) -> None:
    """A target nothing fits in and a queue that never empties while training runs: only the floor share
    lets training go on, and it finishes its steps while every request is answered."""
    async with Engine.open(engine_config(tiny_llama_dir, max_batch=1)) as engine:
        await engine.ensure_adapter("live", seed=1)
        reports = []
        answered: list[int] = []
        async with trio.open_nursery() as load:
            async def client(i: int) -> None:
                while True:
                    result = await engine.generate(greedy(f"The fox {i}", 24, adapter="live"))
                    answered.append(len(result.token_ids))

            for i in range(3):  # one batch row, three clients: one runs, the others wait in the queue
                load.start_soon(client, i)
            await eventually(lambda: len(answered) >= 1)
            with trio.fail_after(120):  # without the floor this would wait for the load to end, i.e. forever
                # A small share, so that load pushes training back between its floor pieces even when a busy
                # machine makes a decode round as slow as a training example (at 0.5 the floor was owed
                # in every round of one CI-like run, and training never yielded).
                reports.append(await engine.train_shadow(spec(2, latency_target_s=1e-6, min_share=0.1)))
            load.cancel_scope.cancel()
        assert reports[0].steps == 2 and reports[0].floor_pieces > 0 and reports[0].yielded_rounds > 0
        assert answered and all(n > 0 for n in answered)


async def test_bad_training_requests_are_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    async with Engine.open(engine_config(tiny_llama_dir)) as engine:
        for bad in (spec(0), spec(-3), spec(5, examples=[]), spec(5, shadow_id="live"), spec(5, lr=5.0),
                    spec(5, batch_size=0), spec(5, latency_target_s=0.0), spec(5, min_share=1.0),
                    spec(5, min_share=-0.1),
                    spec(5, examples=[TrainExample([{"role": "user", "content": "x"}], "")]),
                    spec(5, examples=[TrainExample([{"role": "user", "content": "x"}], "y", weight=-1)]),
                    spec(5, examples=[TrainExample([{"role": "user", "content": "x"}], "y", weight=0)]),
                    spec(5, examples=[TrainExample([{"role": "user"}], "y")]),
                    spec(5, examples=[("x", "y")])):
            with pytest.raises(InvalidRequest):
                await engine.train_shadow(bad)
        with pytest.raises(InvalidMessages):
            await engine.train_shadow(spec(5, examples=[TrainExample("not a list", "y")]))  # type: ignore[arg-type]
        with pytest.raises(AdapterError):  # not a valid adapter id
            await engine.train_shadow(spec(5, shadow_id="bad.id"))
        for call in (engine.promote_shadow("nope", "live"), engine.save_adapter("nope", tmp_path / "x")):
            with pytest.raises(UnknownAdapter):
                await call
        with pytest.raises(InvalidRequest):
            await engine.ensure_adapter("live", rank=0)
        await engine.ensure_adapter("small", rank=2)
        await engine.ensure_adapter("big", rank=4)
        with pytest.raises(AdapterError, match="different shapes"):
            await engine.promote_shadow("small", "big")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(engine.train_shadow, spec(100_000))
            await eventually(lambda: engine.status()["training"] is not None)
            with pytest.raises(AdapterBusy):
                await engine.train_shadow(spec(5, live_id="x", shadow_id="y"))
            for busy in (engine.unload_adapter("shadow"), engine.promote_shadow("shadow", "live")):
                with pytest.raises(AdapterBusy):
                    await busy
            nursery.cancel_scope.cancel()
        assert not (tmp_path / "x").exists()
        assert (await engine.generate(greedy("The quick brown fox", 4))).token_ids


# The embedded SmolLM2 ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_data_dir(request: pytest.FixtureRequest) -> Path:
    from knexa.node.engine import ensure_embedded_model

    data_dir = Path(request.config.cache.mkdir("knexa-engine-data"))  # converted once per checkout
    ensure_embedded_model(data_dir / "models", show_progress=False)
    return data_dir


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
async def test_smollm2_learns_arithmetic_answers_with_a_rank_8_shadow(smollm2_data_dir: Path, dtype: str) -> None:
    from knexa.node.engine import EngineConfig

    pairs = [(12, 7), (23, 19), (5, 48), (31, 30), (64, 17), (9, 9), (40, 2), (15, 26)]
    examples = [TrainExample([{"role": "user", "content": f"What is {a} + {b}? Reply with the number only."}],
                             str(a + b)) for a, b in pairs]
    config = EngineConfig(data_dir=smollm2_data_dir, dtype=dtype, show_progress=False)
    async with Engine.open(config) as engine:
        assert engine.status()["dtype"] == dtype
        await engine.ensure_adapter("live")
        base, live = base_digest(engine), lora_digest(engine, "live")
        train = TrainSpec("live", "shadow", examples, steps=20, lr=1e-3, batch_size=4)
        report = await engine.train_shadow(train)
        # peft keeps LoRA tensors in float32 on a bfloat16 base, so the small updates are not rounded away.
        assert {t.dtype for t in engine._worker.model.adapters.parameters_of("shadow").values()} == {torch.float32}
        assert report.steps == 20 and report.last_loss < report.first_loss / 4, report
        assert base_digest(engine) == base and lora_digest(engine, "live") == live
        answer = await engine.generate(
            GenerationRequest(messages=list(examples[0].prompt_messages), params=SamplingParams(max_new_tokens=8),
                              adapter="shadow"))
        assert answer.text.strip() == "19"
