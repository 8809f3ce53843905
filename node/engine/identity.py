"""What model this is, in a form peers can compare: names, shapes and content hashes."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

WEIGHT_SUFFIXES = (".safetensors", ".bin")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ModelIdentity:
    name: str
    architecture: str
    parameters: int
    dtype: str
    weights_sha256: str
    tokenizer_sha256: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    context_length: int
    vocab_size: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def weights_sha256(folder: Path) -> str:
    """sha256 over the weight files of a model folder, in name order, each prefixed by its name.

    Hashing the files (not the loaded tensors) gives the same value whatever dtype or device the model is
    loaded in; the dtype is compared separately where it matters (imported KV caches)."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    safetensors = [p for p in files if p.name.endswith(".safetensors")]
    files = safetensors or files
    if not files:
        raise FileNotFoundError(f"no weight files in {folder}")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def tokenizer_sha256(tokenizer: Any) -> str:
    """sha256 over what decides tokenization: the vocabulary and rules, special tokens, chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = {
        "backend": backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items())),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "chat_template": tokenizer.chat_template or "",
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
