"""Engine benchmark: single-stream speed against plain `model.generate`, batching gain with 8 concurrent
requests, and time-to-first-token from an imported KV cache against a local prefill.

    python bench/engine.py [--model PATH] [--device cpu|cuda] [--dtype auto|float32|bfloat16]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import trio
from rich.console import Console
from rich.table import Table

from knexa.node.engine import Engine, EngineConfig, GenerationRequest, SamplingParams

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a hash table works.",
    "List five uses of copper and explain each.",
    "Describe the water cycle to a child.",
    "What makes a good password? Explain in detail.",
    "Summarise the history of the printing press.",
    "How do bees communicate? Give details.",
    "Give advice to someone learning to cook.",
]
PARAGRAPH = (
    "Edge devices cooperate over a peer-to-peer mesh. Each node runs a small language model, shares what it "
    "can do, and passes work to peers that have spare capacity. Caches of attention keys and values can move "
    "between nodes so that a peer can continue a prompt without computing it again. "
)


def chat(prompt: str, tokens: int) -> GenerationRequest:
    return GenerationRequest(
        messages=[{"role": "user", "content": prompt}], params=SamplingParams(max_new_tokens=tokens)
    )


async def single_stream(engine: Engine, tokens: int, repeats: int) -> tuple[float, float, int]:
    """Median tokens/s of one request through the engine and of plain `model.generate` on the same model
    object and prompt, making the same number of tokens. The runs alternate so that other load on the
    machine hits both alike; both count from submission (prefill included) to the last token."""
    model = engine._worker.model.model
    prompt_ids = engine._worker.model.chat_ids([{"role": "user", "content": PROMPTS[0]}])
    ids = torch.tensor([prompt_ids], device=model.device)
    # CPU thread counts are per calling thread: give this one what the engine's worker uses.
    torch.set_num_threads(engine.status()["torch_threads"])
    engine_rates, plain_rates, made = [], [], tokens
    for _ in range(repeats):
        result = await engine.generate(chat(PROMPTS[0], tokens))
        made = result.completion_tokens
        engine_rates.append(made / result.total_time_s)
        with torch.no_grad():
            start = time.perf_counter()
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=made,
                min_new_tokens=made,
                do_sample=False,
                pad_token_id=engine.tokenizer().eos_token_id,
            )
            plain_rates.append(made / (time.perf_counter() - start))
    return statistics.median(engine_rates), statistics.median(plain_rates), made


async def concurrent(engine: Engine, tokens: int, count: int) -> tuple[float, float]:
    """Aggregate tokens/s of `count` concurrent requests, and the trio loop's worst lag meanwhile."""
    produced = 0
    worst_lag = 0.0

    async def one(prompt: str) -> None:
        nonlocal produced
        result = await engine.generate(chat(prompt, tokens))  # await first: `+=` would read a stale total
        produced += result.completion_tokens

    async def ticker() -> None:
        nonlocal worst_lag
        while True:
            before = time.perf_counter()
            await trio.sleep(0.01)
            worst_lag = max(worst_lag, time.perf_counter() - before - 0.01)

    start = time.perf_counter()
    async with trio.open_nursery() as outer:
        outer.start_soon(ticker)
        async with trio.open_nursery() as nursery:
            for index in range(count):
                nursery.start_soon(one, PROMPTS[index % len(PROMPTS)])
        outer.cancel_scope.cancel()
    return produced / (time.perf_counter() - start), worst_lag


async def ttft(engine: Engine, prompt_tokens: int, repeats: int) -> dict[str, float]:
    tokenizer = engine.tokenizer()
    text = PARAGRAPH
    while len(tokenizer(text)["input_ids"]) < prompt_tokens:
        text += PARAGRAPH
    ids = tokenizer(text)["input_ids"][:prompt_tokens]
    one_token = SamplingParams(max_new_tokens=1)
    local, imported, export = [], [], []
    for _ in range(repeats):
        result = await engine.generate(GenerationRequest(prompt_token_ids=ids, params=one_token))
        local.append(result.time_to_first_token_s)
        start = time.perf_counter()
        kv, metadata = await engine.prefill(ids)
        export.append(time.perf_counter() - start)
        result = await engine.generate_from_cache(kv, metadata, None, GenerationRequest(params=one_token))
        imported.append(result.time_to_first_token_s)
    size_mb = sum(t.numel() * t.element_size() for t in kv.values()) / 2**20
    return {
        "tokens": len(ids),
        "local": statistics.median(local),
        "imported": statistics.median(imported),
        "export": statistics.median(export),
        "size_mb": size_mb,
    }


async def main(args: argparse.Namespace) -> None:
    console = Console()
    config = EngineConfig(
        model=args.model,
        data_dir=args.data_dir,
        device=args.device,
        dtype=args.dtype,
        max_batch=8,
        torch_threads=args.threads,
    )
    async with Engine.open(config) as engine:
        status = engine.status()
        console.print(
            f"model {status['model']['name']} ({status['model']['parameters'] / 1e6:.1f}M params) on "
            f"{status['device']} {status['dtype']}, {status['torch_threads']} torch threads, "
            f"loaded in {status['load_time_s']:.1f}s"
        )
        await engine.generate(chat(PROMPTS[0], 4))  # warm up kernels and caches

        single, plain, made = await single_stream(engine, args.tokens, args.repeats)
        aggregate, lag = await concurrent(engine, args.tokens, 8)
        first = await ttft(engine, args.prompt_tokens, args.repeats)

    table = Table(title=f"knexa engine benchmark on {status['device']} ({status['dtype']})")
    for column in ("measure", "engine", "reference", "ratio", "target"):
        table.add_column(column, justify="right" if column != "measure" else "left")
    table.add_row("single stream tokens/s (vs model.generate)", *_cells(single, plain), ">= 0.95")
    table.add_row("8 concurrent, aggregate tokens/s (vs 1)", *_cells(aggregate, single), ">= 2")
    table.add_row(
        f"time to first token, {first['tokens']:.0f}-token prompt: imported KV (vs local prefill), s",
        f"{first['imported']:.3f}",
        f"{first['local']:.3f}",
        f"{first['imported'] / first['local']:.3f}",
        "< 1",
    )
    console.print(table)
    console.print(
        f"KV export of {first['tokens']:.0f} tokens: {first['size_mb']:.1f} MiB, prefill+export "
        f"{first['export']:.3f}s; single-stream runs made {made} tokens each; medians of {args.repeats} runs; "
        f"worst trio loop lag during the 8 concurrent requests {lag * 1000:.1f} ms"
    )


def _cells(value: float, reference: float) -> tuple[str, str, str]:
    return f"{value:.2f}", f"{reference:.2f}", f"{value / reference:.2f}"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: the embedded SmolLM2)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--data-dir", type=Path, default=None, help="where the converted embedded model is cached")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: cores - 1)")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per request")
    parser.add_argument("--prompt-tokens", type=int, default=1000, help="prompt length for the TTFT comparison")
    parser.add_argument("--repeats", type=int, default=5)
    return parser.parse_args()


if __name__ == "__main__":
    trio.run(main, parse_args())
