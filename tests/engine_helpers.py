"""Tiny random models built offline for the engine tests, and fixtures and helpers shared by them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import trio

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Peers exchange caches and messages over the mesh.",
    "What is the capital of France? Paris is the capital of France.",
    "A small language model runs on the edge of the network.",
    "user assistant system hello world tokens stream batch adapter",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`",
]

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(out_dir: Path, vocab_size: int = 320) -> None:
    """A byte-level BPE tokenizer trained on CORPUS, saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)


def build_tiny_model(out_dir: Path, arch: str = "llama", seed: int = 0, max_positions: int = 256) -> Path:
    """A 2-layer random causal LM with a trained byte-level tokenizer, saved to out_dir.

    The weights are drawn with a wide initializer so that the logits are peaked: greedy decoding then has
    no near-ties, and batched (padded) and sequential runs pick the same tokens despite float rounding.
    """
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    common = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    if arch == "llama":
        config = LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=max_positions,
            tie_word_embeddings=False,
            **common,
        )
        model = LlamaForCausalLM(config)
    elif arch == "gpt2":
        config = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=max_positions, **common)
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}")
    model.save_pretrained(out_dir)
    return out_dir


# Built once per session and shared by the test modules (each wraps these in its own fixtures).
_BUILT: dict[str, Path] = {}


def shared_tiny_model(factory: pytest.TempPathFactory, arch: str) -> Path:
    if arch not in _BUILT:
        _BUILT[arch] = build_tiny_model(factory.mktemp(f"tiny-{arch}"), arch, seed=0 if arch == "llama" else 1)
    return _BUILT[arch]


def shared_lora_adapters(factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from knexa.node.engine import create_random_lora_adapter

    if "lora" not in _BUILT:
        base = shared_tiny_model(factory, "llama")
        root = factory.mktemp("tiny-lora")
        create_random_lora_adapter(base, root / "a", seed=1, b_std=0.3)
        create_random_lora_adapter(base, root / "b", seed=2, b_std=0.3)
        _BUILT["lora"] = root
    return _BUILT["lora"] / "a", _BUILT["lora"] / "b"


def engine_config(model_dir: Path, **overrides: object):
    from knexa.node.engine import EngineConfig

    settings: dict = dict(model=model_dir, dtype="float32", show_progress=False, max_batch=8, max_queue=16)
    settings.update(overrides)
    return EngineConfig(**settings)


def greedy(prompt: str | list[int], max_new_tokens: int = 12, **fields: object):
    from knexa.node.engine import GenerationRequest, SamplingParams

    params = SamplingParams(max_new_tokens=max_new_tokens)
    if isinstance(prompt, str):
        return GenerationRequest(prompt=prompt, params=params, **fields)
    return GenerationRequest(prompt_token_ids=prompt, params=params, **fields)


def weights_checksum(model) -> float:
    """A sum over the base model's own weights (LoRA tensors excluded)."""
    import torch

    with torch.no_grad():
        return float(
            sum(p.double().abs().sum() for name, p in model.named_parameters() if "lora_" not in name)
        )


PROMPTS = [
    "The quick brown fox",
    "Peers exchange caches",
    "What is the capital of France?",
    "A small language model runs on the edge of the network.",
    "hello world",
    "0123456789",
    "stream batch adapter tokens",
    "The lazy dog",
]


async def eventually(predicate: Callable[[], bool], timeout_s: float = 30.0, step_s: float = 0.01) -> None:
    """Poll a condition the engine does not signal (e.g. a request leaving the batch) until it holds."""
    with trio.fail_after(timeout_s):
        while True:
            if predicate():
                return
            await trio.sleep(step_s)
