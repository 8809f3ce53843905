"""Engine logic that needs no model: validation, stop strings, queue admission, batch layout, KV checks."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from knexa.node.engine.batch import BatchLayout
from knexa.node.engine.errors import (
    EngineClosed,
    EngineOverloaded,
    IncompatibleCache,
    InvalidMessages,
    InvalidRequest,
)
from knexa.node.engine.forward_cache import cache_kwargs, output_cache
from knexa.node.engine.generation import RowProgress
from knexa.node.engine.identity import ModelIdentity
from knexa.node.engine.kv import check_import, export_cache
from knexa.node.engine.queue import RequestQueue
from knexa.node.engine.requests import GenerationRequest, validate_messages
from knexa.node.engine.sampler import new_generator, pick_tokens
from knexa.node.engine.sampling import SamplingParams
from knexa.node.engine.stats import MovingAverage
from knexa.node.engine.stops import TextStream

# A toy byte-level vocabulary: token i decodes to PIECES[i]; "é" is split over two tokens.
PIECES = [b"Hel", b"lo", b" wor", b"ld", b"\xc3", b"\xa9", b"!", b"END", b" "]


def decode(tokens: list[int]) -> str:
    return b"".join(PIECES[t] for t in tokens).decode("utf-8", errors="replace")


def run_stream(tokens: list[int], stop: tuple[str, ...] = ()) -> tuple[list[str], TextStream]:
    stream = TextStream(decode, stop)
    pieces = []
    for token in tokens:
        pieces.append(stream.push(token))
        if stream.stopped:
            break
    pieces.append(stream.finish())
    return pieces, stream


# Sampling parameters and requests -------------------------------------------------------------


def test_sampling_params_defaults_are_greedy_and_valid() -> None:
    params = SamplingParams().validate()
    assert params.greedy


@pytest.mark.parametrize(
    "fields",
    [
        {"temperature": -0.1},
        {"temperature": float("nan")},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"top_k": 1.5},
        {"max_new_tokens": 0},
        {"seed": -1},
        {"stop": ("",)},
        {"stop": tuple("abcdefghijklmnopq")},
        {"temperature": True},
    ],
)
def test_sampling_params_reject_out_of_range(fields: dict) -> None:
    with pytest.raises(InvalidRequest):
        SamplingParams(**fields).validate()


def test_sampling_params_from_dict() -> None:
    params = SamplingParams.from_dict({"temperature": 0.7, "stop": "\n", "max_new_tokens": 5})
    assert params.stop == ("\n",) and params.temperature == 0.7
    with pytest.raises(InvalidRequest, match="unknown"):
        SamplingParams.from_dict({"temprature": 1})


@pytest.mark.parametrize(
    "messages",
    [
        [],
        "hello",
        [{"role": "user"}],
        [{"role": "robot", "content": "x"}],
        [{"role": "user", "content": 3}],
        [{"role": "user", "content": "x", "extra": 1}],
        ["user: hi"],
    ],
)
def test_malformed_messages_are_rejected(messages: object) -> None:
    with pytest.raises(InvalidMessages) as info:
        validate_messages(messages)
    assert info.value.code == "invalid_messages"


def test_request_needs_exactly_one_prompt_kind() -> None:
    with pytest.raises(InvalidRequest):
        GenerationRequest().validate()
    with pytest.raises(InvalidRequest):
        GenerationRequest(prompt="a", prompt_token_ids=[1]).validate()
    with pytest.raises(InvalidRequest):
        GenerationRequest(prompt_token_ids=[1, -2]).validate()
    GenerationRequest(messages=[{"role": "user", "content": "hi"}]).validate()


# Incremental text and stop strings ------------------------------------------------------------


def test_stream_releases_text_and_waits_for_split_characters() -> None:
    pieces, stream = run_stream([0, 1, 4, 5, 6])
    assert "".join(pieces) == "Helloé!" == stream.text
    assert "\ufffd" not in "".join(pieces)
    assert pieces[2] == ""  # the first byte of "é" alone is not released


def test_stop_string_across_tokens_is_cut_and_not_emitted() -> None:
    pieces, stream = run_stream([0, 1, 2, 3, 6], stop=("o wo",))
    assert stream.stopped
    assert "".join(pieces) == "Hell" == stream.text


def test_possible_stop_prefix_is_held_then_released() -> None:
    stream = TextStream(decode, ("lo!",))
    assert stream.push(0) == "He"  # "l" could start "lo!"
    assert stream.push(1) == "l"  # "lo" still could
    assert stream.push(2) == "lo wor"  # ruled out
    assert not stream.stopped


def test_stop_at_start_gives_empty_text() -> None:
    pieces, stream = run_stream([7, 0], stop=("END",))
    assert stream.stopped and stream.text == "" and "".join(pieces) == ""


def test_row_progress_finishes_on_eos_length_and_stop() -> None:
    eos = RowProgress(3, SamplingParams(max_new_tokens=10), {7}, decode, None, 0.0, 0.0)
    eos.accept(0)
    eos.accept(7)
    assert eos.finish_reason == "stop" and eos.token_ids == [0]
    assert eos.result().text == "Hel" and eos.result().completion_tokens == 1

    length = RowProgress(3, SamplingParams(max_new_tokens=2), set(), decode, None, 0.0, 0.0)
    length.accept(0)
    length.accept(4)  # half a character: released at the end anyway
    assert length.finish_reason == "length" and length.result().text == "Hel\ufffd"

    stop = RowProgress(3, SamplingParams(max_new_tokens=10, stop=("lo",)), set(), decode, "a1", 0.0, 0.0)
    stop.accept(0)
    stop.accept(1)
    assert stop.finish_reason == "stop" and stop.result().text == "Hel" and stop.result().adapter == "a1"
    with pytest.raises(RuntimeError):
        stop.accept(2)


# Admission -------------------------------------------------------------------------------------


def test_queue_overflow_raises_at_once_and_close_returns_waiting() -> None:
    queue: RequestQueue[int] = RequestQueue(2)
    queue.put_nowait(1)
    queue.put_nowait(2)
    with pytest.raises(EngineOverloaded) as info:
        queue.put_nowait(3)
    assert info.value.code == "overloaded"
    assert queue.take(1, timeout_s=0) == [1]
    assert queue.close() == [2]
    with pytest.raises(EngineClosed):
        queue.put_nowait(4)
    assert queue.take(5, timeout_s=None) == []


def test_queue_take_where_lets_matching_items_pass() -> None:
    queue: RequestQueue[int] = RequestQueue(8)
    for item in (1, 2, 3, 4, 5):
        queue.put_nowait(item)
    assert queue.take_where(lambda item: item % 2 == 0, max_items=1) == [2]
    assert queue.take_where(lambda item: item > 10, max_items=3) == []
    assert queue.take(8, timeout_s=0) == [1, 3, 4, 5]


def test_queue_take_wakes_on_put_from_another_thread() -> None:
    queue: RequestQueue[str] = RequestQueue(4)
    timer = threading.Timer(0.05, queue.put_nowait, args=("job",))
    timer.start()
    try:
        assert queue.take(4, timeout_s=5) == ["job"]
    finally:
        timer.join()
    assert queue.take(4, timeout_s=0.01) == []


# Batch layout ----------------------------------------------------------------------------------


def test_batch_layout_pads_joins_and_trims_leaves() -> None:
    layout = BatchLayout(4)
    first = layout.add([("a", 5)])
    assert first.pad_existing == 0 and first.pad_new == [0] and layout.width == 5
    layout.advance()
    joined = layout.add([("b", 3), ("c", 9)])
    assert joined.pad_existing == 3 and joined.pad_new == [6, 0]
    assert layout.pads() == [3, 6, 0] and layout.free_rows == 1
    with pytest.raises(ValueError):
        layout.add([("d", 1), ("e", 1)])
    removal = layout.remove(["c"])
    assert removal.keep == [0, 1] and removal.trim_left == 3
    assert layout.pads() == [0, 3] and layout.width == 6
    layout.advance()
    assert layout.lengths == [7, 4]
    assert layout.remove(["a", "b"]).keep == [] and layout.width == 0


def test_moving_average_starts_at_first_sample() -> None:
    average = MovingAverage(weight=0.5)
    average.add(10.0)
    average.add(20.0)
    assert average.value == 15.0


# Sampling on logits ----------------------------------------------------------------------------


def test_pick_tokens_greedy_and_seeded_sampling() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 0.0]])
    greedy = SamplingParams()
    assert pick_tokens(logits, [greedy, greedy], [None, None]) == [1, 0]
    hot = SamplingParams(temperature=1.0, seed=7)
    first = [pick_tokens(logits[:1], [hot], [new_generator(hot, torch.device("cpu"))])[0] for _ in range(3)]
    again = [pick_tokens(logits[:1], [hot], [new_generator(hot, torch.device("cpu"))])[0] for _ in range(3)]
    assert first == again
    top1 = SamplingParams(temperature=5.0, top_k=1, seed=1)
    nucleus = SamplingParams(temperature=1.0, top_p=0.01, seed=1)
    cpu = torch.device("cpu")
    for _ in range(5):
        assert pick_tokens(logits, [top1, nucleus], [new_generator(top1, cpu), new_generator(nucleus, cpu)]) == [1, 0]


# KV import checks ------------------------------------------------------------------------------

IDENTITY = ModelIdentity(
    name="toy",
    architecture="Toy",
    parameters=1,
    dtype="float32",
    weights_sha256="w" * 64,
    tokenizer_sha256="t" * 64,
    num_layers=2,
    num_kv_heads=2,
    head_dim=4,
    context_length=64,
    vocab_size=100,
)


def toy_cache(tokens: int = 3) -> tuple[dict[str, torch.Tensor], dict]:
    pairs = [(torch.randn(1, 2, tokens, 4), torch.randn(1, 2, tokens, 4)) for _ in range(2)]
    return export_cache(pairs, list(range(tokens)), IDENTITY, None)


def test_kv_export_is_plain_and_round_trips() -> None:
    import msgpack

    tensors, metadata = toy_cache()
    assert set(tensors) == {"layers.0.keys", "layers.0.values", "layers.1.keys", "layers.1.values"}
    assert all(t.is_contiguous() and t.device.type == "cpu" for t in tensors.values())
    assert msgpack.unpackb(msgpack.packb(metadata)) == metadata
    pairs, token_ids = check_import(tensors, metadata, IDENTITY)
    assert token_ids == [0, 1, 2] and torch.equal(pairs[1][0], tensors["layers.1.keys"])


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda t, m: m.update(weights_sha256="x" * 64), "another model"),
        (lambda t, m: m.update(dtype="bfloat16"), "dtype"),
        (lambda t, m: m.update(num_layers=3), "layers"),
        (lambda t, m: m.update(token_ids=[1, 2]), "shape"),
        (lambda t, m: m.update(token_ids=[1, 2, 999]), "token_ids"),
        (lambda t, m: m.update(format="other"), "format"),
        (lambda t, m: t.pop("layers.1.values"), "names"),
        (lambda t, m: t.update({"layers.0.keys": t["layers.0.keys"][:, :1]}), "shape"),
        (lambda t, m: t.update({"layers.0.keys": t["layers.0.keys"].double()}), "dtype"),
        (lambda t, m: t.update({"layers.0.keys": [[0.0]]}), "not a tensor"),
    ],
)
def test_kv_import_rejects_foreign_or_malformed_caches(damage, message: str) -> None:
    tensors, metadata = toy_cache()
    damage(tensors, metadata)
    with pytest.raises(IncompatibleCache, match=message) as info:
        check_import(tensors, metadata, IDENTITY)
    assert info.value.code == "incompatible_cache"


# Embedded model conversion --------------------------------------------------------------------


def test_embedded_conversion_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from knexa.node.engine import models

    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(models, "embedded_gguf_path", lambda: gguf)

    def interrupted(source: Path, out_dir: Path) -> None:
        out_dir.mkdir()
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        models.ensure_embedded_model(tmp_path / "models", show_progress=False)
    assert list((tmp_path / "models").iterdir()) == []

    calls = []

    def converted(source: Path, out_dir: Path) -> None:
        calls.append(source)
        out_dir.mkdir()
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(models, "convert_gguf", converted)
    first = models.ensure_embedded_model(tmp_path / "models", show_progress=False)
    second = models.ensure_embedded_model(tmp_path / "models", show_progress=False)
    assert first == second and (first / "config.json").is_file() and len(calls) == 1
    assert [p.name for p in (tmp_path / "models").iterdir()] == [first.name]


# Only the signatures of these forwards are read, never called.
class _OlderCausalLM:  # a transformers 5 release from before the `cache` argument
    def forward(self, input_ids=None, past_key_values=None, use_cache=None):
        raise NotImplementedError


class _NewerCausalLM:
    def forward(self, input_ids=None, cache=None, use_cache=None):
        raise NotImplementedError


class _Wrapped:  # as peft wraps a model: the base model's forward decides
    def __init__(self, base: object) -> None:
        self.base = base

    def get_base_model(self) -> object:
        return self.base


def test_the_cache_goes_by_the_name_the_models_forward_takes():
    cache = object()
    assert cache_kwargs(_OlderCausalLM(), cache) == {"past_key_values": cache}
    assert cache_kwargs(_NewerCausalLM(), cache) == {"cache": cache}
    assert cache_kwargs(_Wrapped(_NewerCausalLM()), cache) == {"cache": cache}
    assert cache_kwargs(_Wrapped(_OlderCausalLM()), cache) == {"past_key_values": cache}


def test_the_returned_cache_is_read_under_either_name():
    from transformers.modeling_outputs import CausalLMOutputWithPast

    cache = object()
    fields = CausalLMOutputWithPast.__dataclass_fields__
    returned = CausalLMOutputWithPast(**{"cache" if "cache" in fields else "past_key_values": cache})
    assert output_cache(returned) is cache

    class Older:
        past_key_values = cache

    assert output_cache(Older()) is cache
