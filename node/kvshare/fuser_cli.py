"""`knexa-node fuser train`: train a cache fuser for a pair of local models on a text corpus.

Both models are loaded frozen in float32 (the fuser trains in float32 whatever dtype the engine serves in);
on CUDA when present. Progress shows the step, the running loss and the time left in the budget. The fuser is
saved as `<name>.safetensors` + `<name>.json` under the fuser folder (by default `<cache dir>/fusers`, where
the daemon looks for it), named after the models' weights hashes so a node finds it for the right pair."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from knexa.node.engine.identity import weights_sha256

from .fuser import CacheFuser, FuserSpec, save_fuser
from .fuser_train import Side, evaluate, train_fuser


@dataclass
class TrainReport:
    name: str
    weights: Path
    description: Path
    steps: int
    held_out_before: float
    held_out_after: float
    device: str
    train_texts: int
    held_out_texts: int


def resolve_folder(model: str, cache_dir: Path) -> Path:
    """A model folder; `embedded` is the shipped SmolLM2, converted once into the cache dir."""
    if model == "embedded":
        from knexa.node.engine import EngineConfig
        from knexa.node.engine.models import ensure_embedded_model

        return ensure_embedded_model(EngineConfig(data_dir=cache_dir).models_dir, show_progress=True)
    folder = Path(model).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"no model folder {folder}")
    return folder


def load_side(folder: Path, device: torch.device) -> Side:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{folder}: a fast tokenizer is needed (character offsets map tokens between models)")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device)
    return Side(model, tokenizer)


def corpus_texts(path: Path, max_chars: int = 600) -> list[str]:
    """Non-empty paragraphs (blank-line separated) of the corpus, cut into pieces of at most max_chars."""
    texts = []
    for paragraph in path.read_text(encoding="utf-8").split("\n\n"):
        paragraph = " ".join(paragraph.split())
        while paragraph:
            texts.append(paragraph[:max_chars])
            paragraph = paragraph[max_chars:]
    return [t for t in texts if len(t) >= 20]


def train_pair(
    receiver: str, sharer: str, corpus: Path, *, cache_dir: Path, out_dir: Path | None = None, name: str | None = None,
    steps: int = 200, lr: float = 1e-3, hidden: int = 256, budget_s: float | None = None, device: str = "auto",
    held_out_fraction: float = 0.1, seed: int = 0, progress: Any = None,
) -> TrainReport:
    """Train and save a fuser from `sharer` into `receiver`; `progress(step, loss)` is called each step."""
    target = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          ("cpu" if device == "auto" else device))
    receiver_folder, sharer_folder = resolve_folder(receiver, cache_dir), resolve_folder(sharer, cache_dir)
    texts = corpus_texts(corpus)
    if len(texts) < 2:
        raise ValueError(f"{corpus}: need at least two paragraphs of text")
    random.Random(seed).shuffle(texts)
    split = max(1, int(len(texts) * held_out_fraction))
    held_out, train = texts[:split], texts[split:]
    receiver_side, sharer_side = load_side(receiver_folder, target), load_side(sharer_folder, target)
    receiver_hash, sharer_hash = weights_sha256(receiver_folder), weights_sha256(sharer_folder)
    torch.manual_seed(seed)
    spec = FuserSpec.for_models(sharer_side.model.config, receiver_side.model.config, hidden=hidden,
                                sharer_model=sharer_hash, receiver_model=receiver_hash)
    fuser = CacheFuser(spec).to(target)
    before = evaluate(fuser, receiver_side, sharer_side, held_out)
    losses = train_fuser(fuser, receiver_side, sharer_side, train, steps=steps, lr=lr, seed=seed,
                         time_budget_s=budget_s, on_step=progress or (lambda step, loss: None))
    after = evaluate(fuser, receiver_side, sharer_side, held_out)
    name = name or f"{sharer_hash[:12]}-to-{receiver_hash[:12]}"
    weights, description = save_fuser(fuser.to("cpu"), out_dir or cache_dir / "fusers", name)
    return TrainReport(name, weights, description, len(losses), before, after, str(target), len(train), len(held_out))
