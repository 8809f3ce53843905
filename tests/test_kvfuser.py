"""Cache-to-cache fusion mechanics on two tiny random models of different architectures and tokenizers
(a 3-layer Llama receiving from a 2-layer GPT-2): layer and token maps, training lowers the receiver's
held-out loss against the untrained fuser, and a save/load round trip."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from knexa.node.engine.identity import weights_sha256
from knexa.node.kvshare.fuser import (
    CacheFuser,
    FuserError,
    FuserSpec,
    align_tokens,
    last_aligned_layer_map,
    load_fuser,
    save_fuser,
)
from knexa.node.kvshare.fuser_train import Side, evaluate, fused_loss, train_fuser
from tests.engine_helpers import CORPUS, build_tiny_model, build_tokenizer

WORDS = " ".join(CORPUS[:5]).replace(".", " .").replace("?", " ?").split()


def texts(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        start = rng.randrange(len(WORDS) - 16)
        out.append(" ".join(WORDS[start : start + rng.randint(12, 16)]))
    return out


def tiny(tmp_path, arch: str, vocab: int, layers: int, seed: int) -> Side:
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    folder = tmp_path / arch
    build_tokenizer(folder, vocab_size=vocab)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(seed)
    if arch == "llama":
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=128)
        model = LlamaForCausalLM(config)
    else:
        config = GPT2Config(n_embd=48, n_layer=layers, n_head=3, vocab_size=len(tokenizer), n_positions=128)
        model = GPT2LMHeadModel(config)
    return Side(model, tokenizer)


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Side, Side]:
    root = tmp_path_factory.mktemp("fusion")
    return tiny(root, "llama", 320, 3, 0), tiny(root, "gpt2", 400, 2, 1)


def test_layer_map_is_aligned_from_the_last_layer() -> None:
    assert last_aligned_layer_map(2, 3) == [None, 0, 1]
    assert last_aligned_layer_map(5, 3) == [2, 3, 4]
    assert last_aligned_layer_map(3, 3) == [0, 1, 2]
    with pytest.raises(FuserError):
        last_aligned_layer_map(0, 3)


def test_token_map_takes_the_sharer_token_covering_the_last_character() -> None:
    # "hello world": receiver "hel|lo| world", sharer "hello| wor|ld" (with a special token first).
    receiver = [(0, 3), (3, 5), (5, 11)]
    sharer = [(0, 0), (0, 5), (5, 9), (9, 11)]
    assert align_tokens(receiver, sharer) == [1, 1, 3]
    assert align_tokens([(0, 0), (0, 2)], [(0, 5)]) == [0, 0]


def test_the_tokenizers_and_architectures_really_differ(pair) -> None:
    receiver, sharer = pair
    text = texts(0, 1)[0]
    assert receiver.encode(text)[0] != sharer.encode(text)[0]
    assert type(receiver.model).__name__ != type(sharer.model).__name__


def test_an_untrained_fuser_leaves_the_receiver_cache_unchanged(pair) -> None:
    receiver, sharer = pair
    fuser = CacheFuser(FuserSpec.for_models(sharer.model.config, receiver.model.config, hidden=32))
    assert fuser.spec.layer_map == [None, 0, 1]
    text = texts(1, 1)[0]
    r_ids, r_off = receiver.encode(text)
    s_ids, s_off = sharer.encode(text)
    r_pairs, s_pairs = receiver.prefill(r_ids), sharer.prefill(s_ids)
    fused = fuser(r_pairs, s_pairs, align_tokens(r_off, s_off))
    for (k, v), (fk, fv) in zip(r_pairs, fused, strict=True):
        assert torch.equal(k, fk) and torch.equal(v, fv)
    with pytest.raises(FuserError, match="layers"):
        fuser(r_pairs[:2], s_pairs, align_tokens(r_off, s_off))


def test_training_lowers_held_out_loss_and_survives_a_round_trip(pair, tmp_path) -> None:
    receiver, sharer = pair
    torch.manual_seed(0)
    fuser = CacheFuser(FuserSpec.for_models(sharer.model.config, receiver.model.config, hidden=64,
                                            sharer_model="tiny-gpt2", receiver_model="tiny-llama"))
    held_out = texts(99, 12)
    before = evaluate(fuser, receiver, sharer, held_out)
    frozen = [p.clone() for p in receiver.model.parameters()] + [p.clone() for p in sharer.model.parameters()]
    steps = []
    losses = train_fuser(fuser, receiver, sharer, texts(7, 64), steps=60, lr=3e-3,
                         on_step=lambda step, loss: steps.append(step))
    after = evaluate(fuser, receiver, sharer, held_out)
    assert len(losses) == 60 and steps == list(range(60))
    assert after < before - 0.1, (before, after)
    now = list(receiver.model.parameters()) + list(sharer.model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(frozen, now, strict=True))  # only the fuser learned

    weights, description = save_fuser(fuser, tmp_path / "fusers", "gpt2-to-llama")
    assert weights.name == "gpt2-to-llama.safetensors" and description.name == "gpt2-to-llama.json"
    loaded = load_fuser(tmp_path / "fusers", "gpt2-to-llama")
    assert loaded.spec == fuser.spec
    text = held_out[0]
    with torch.no_grad():
        assert fused_loss(loaded, receiver, sharer, text).item() == pytest.approx(
            fused_loss(fuser, receiver, sharer, text).item(), abs=1e-6
        )
    with pytest.raises(FuserError, match="no fuser"):
        load_fuser(tmp_path / "fusers", "missing")
    with pytest.raises(FuserError, match="invalid fuser name"):
        load_fuser(tmp_path / "fusers", "../etc/passwd")
    description.write_text('{"format": "other"}')
    with pytest.raises(FuserError):
        load_fuser(tmp_path / "fusers", "gpt2-to-llama")


def test_fuser_train_command_trains_and_saves_a_fuser_the_node_can_load(tmp_path) -> None:
    from typer.testing import CliRunner

    from knexa.cli.main import app
    from tests.test_kvcollab import build_sharer

    receiver = build_tiny_model(tmp_path / "receiver")
    sharer = build_sharer(tmp_path / "sharer")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(texts(5, 24)))
    out = tmp_path / "fusers"
    result = CliRunner().invoke(app, [
        "fuser", "train", "--receiver", str(receiver), "--sharer", sharer, "--corpus", str(corpus),
        "--steps", "6", "--hidden", "16", "--out", str(out), "--name", "pair", "--device", "cpu",
        "--data-dir", str(tmp_path / "node"),
    ])
    assert result.exit_code == 0, result.output
    assert "fuser pair: 6 steps on cpu" in result.output and "held-out" in result.output
    fuser = load_fuser(out, "pair")
    assert fuser.spec.receiver_model == weights_sha256(receiver) and fuser.spec.sharer_model == weights_sha256(
        Path(sharer))
    missing = CliRunner().invoke(app, ["fuser", "train", "--sharer", sharer, "--corpus", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "no corpus file" in missing.output
