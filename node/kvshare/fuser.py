"""Cache-to-cache fusion (C2C): project a sharer model's KV cache into a receiver model's cache space.

Per receiver layer that has a sharer partner, one `LayerFuser` for keys and one for values:
concat(receiver, sharer aligned to the receiver's tokens) over the flattened heads -> a small MLP ->
gated residual onto the receiver's own keys (values): `fused = receiver + sigmoid(gate) * mlp(concat)`.
The MLP's last layer starts at zero, so an untrained fuser returns the receiver's cache unchanged.

- Layer map "last aligned": the receiver's last layer pairs with the sharer's last, and so on backwards;
  receiver layers with no partner (a shallower sharer) are left as they are.
- Token map: the two tokenizers cut the same text differently; each receiver token takes the sharer token
  that covers its last character (character offsets from both fast tokenizers).

A fuser is two files: `<name>.safetensors` (weights) and `<name>.json` (shapes, models, layer map); loaded
by name from a folder. Pure torch: no I/O beyond those files, no trio."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

FUSER_FORMAT = "knexa-fuser/1"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

Pairs = Sequence[tuple[torch.Tensor, torch.Tensor]]
PairList = list[tuple[torch.Tensor, torch.Tensor]]


class FuserError(ValueError):
    """A fuser file is missing, malformed or does not fit the caches it is given."""


def last_aligned_layer_map(sharer_layers: int, receiver_layers: int) -> list[int | None]:
    """For each receiver layer, the sharer layer it fuses (None when the sharer has no layer left)."""
    if sharer_layers <= 0 or receiver_layers <= 0:
        raise FuserError("both models need at least one layer")
    offset = sharer_layers - receiver_layers
    return [r + offset if r + offset >= 0 else None for r in range(receiver_layers)]


def align_tokens(receiver_offsets: Sequence[tuple[int, int]], sharer_offsets: Sequence[tuple[int, int]]) -> list[int]:
    """For each receiver token, the index of the sharer token covering its last character (or the last sharer
    token starting before it). Tokens without text (special tokens, offsets (0, 0)) map to the sharer's first
    token. Both offset lists are character spans into the same text, in order."""
    if not sharer_offsets:
        raise FuserError("the sharer's cache covers no tokens")
    starts = [(s, i) for i, (s, e) in enumerate(sharer_offsets) if e > s]
    out, j = [], 0
    for start, end in receiver_offsets:
        if end <= start:
            out.append(0)
            continue
        last_char = end - 1
        while j + 1 < len(starts) and starts[j + 1][0] <= last_char:
            j += 1
        out.append(starts[j][1] if starts else 0)
    return out


@dataclass(frozen=True)
class FuserSpec:
    sharer_layers: int
    sharer_kv_heads: int
    sharer_head_dim: int
    receiver_layers: int
    receiver_kv_heads: int
    receiver_head_dim: int
    hidden: int = 256
    sharer_model: str = ""  # names or weights hashes, to refuse a fuser for other models
    receiver_model: str = ""
    layer_map: list[int | None] = field(default_factory=list)
    format: str = FUSER_FORMAT

    def with_map(self) -> FuserSpec:
        if self.layer_map:
            return self
        mapping = last_aligned_layer_map(self.sharer_layers, self.receiver_layers)
        return FuserSpec(**{**asdict(self), "layer_map": mapping})

    @classmethod
    def for_models(cls, sharer_config: Any, receiver_config: Any, hidden: int = 256, **names: str) -> FuserSpec:
        """The spec for two transformers model configs (layers, KV heads and head size of each)."""
        return cls(*_cache_shape(sharer_config), *_cache_shape(receiver_config), hidden=hidden, **names).with_map()


def _cache_shape(config: Any) -> tuple[int, int, int]:
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return int(layers), int(kv_heads), int(head_dim)


class _Projector(nn.Module):
    """concat(receiver, sharer) -> MLP -> gated residual onto the receiver, for one of keys or values."""

    def __init__(self, receiver_width: int, sharer_width: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(receiver_width + sharer_width)
        self.up = nn.Linear(receiver_width + sharer_width, hidden)
        self.down = nn.Linear(hidden, receiver_width)
        nn.init.zeros_(self.down.weight)  # untrained: the receiver's own cache, unchanged
        nn.init.zeros_(self.down.bias)
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, receiver: torch.Tensor, sharer: torch.Tensor) -> torch.Tensor:
        # (B, H, T, D) -> (B, T, H*D): fuse per token over all heads.
        b, h, t, d = receiver.shape
        r = receiver.transpose(1, 2).reshape(b, t, h * d)
        s = sharer.transpose(1, 2).reshape(b, t, -1)
        delta = self.down(nn.functional.gelu(self.up(self.norm(torch.cat([r, s], dim=-1)))))
        fused = r + torch.sigmoid(self.gate) * delta
        return fused.reshape(b, t, h, d).transpose(1, 2)


class LayerFuser(nn.Module):
    def __init__(self, spec: FuserSpec) -> None:
        super().__init__()
        r = spec.receiver_kv_heads * spec.receiver_head_dim
        s = spec.sharer_kv_heads * spec.sharer_head_dim
        self.keys = _Projector(r, s, spec.hidden)
        self.values = _Projector(r, s, spec.hidden)


class CacheFuser(nn.Module):
    """All layer fusers of one (sharer, receiver) pair."""

    def __init__(self, spec: FuserSpec) -> None:
        super().__init__()
        self.spec = spec.with_map()
        self.layers = nn.ModuleDict(
            {str(r): LayerFuser(self.spec) for r, s in enumerate(self.spec.layer_map) if s is not None}
        )

    def forward(self, receiver: Pairs, sharer: Pairs, alignment: Sequence[int]) -> PairList:
        """The receiver's cache with each mapped layer fused. `alignment[i]` is the sharer token for receiver
        token i (see align_tokens); the receiver cache must cover exactly len(alignment) tokens."""
        spec = self.spec
        if len(receiver) != spec.receiver_layers or len(sharer) != spec.sharer_layers:
            raise FuserError(
                f"fuser is for {spec.sharer_layers}->{spec.receiver_layers} layers, got {len(sharer)}->{len(receiver)}"
            )
        tokens = receiver[0][0].shape[-2]
        if len(alignment) != tokens:
            raise FuserError(f"alignment has {len(alignment)} entries for a {tokens}-token receiver cache")
        index = torch.as_tensor(list(alignment), dtype=torch.long, device=receiver[0][0].device)
        out = []
        for r, (keys, values) in enumerate(receiver):
            s = spec.layer_map[r]
            if s is None:
                out.append((keys, values))
                continue
            sk, sv = sharer[s]
            if sk.shape[1] != spec.sharer_kv_heads or sk.shape[-1] != spec.sharer_head_dim:
                raise FuserError(f"sharer layer {s} has shape {tuple(sk.shape)}, not this fuser's")
            if int(index.max()) >= sk.shape[-2]:
                raise FuserError("alignment points past the sharer's cache")
            sk, sv = sk.index_select(2, index).to(keys.dtype), sv.index_select(2, index).to(values.dtype)
            layer = self.layers[str(r)]
            out.append((layer.keys(keys, sk), layer.values(values, sv)))
        return out


def _paths(folder: Path, name: str) -> tuple[Path, Path]:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise FuserError(f"invalid fuser name {name!r}: use letters, digits, . _ - (up to 128)")
    return folder / f"{name}.safetensors", folder / f"{name}.json"


def save_fuser(fuser: CacheFuser, folder: Path, name: str) -> tuple[Path, Path]:
    """Write `<name>.safetensors` and `<name>.json` into folder."""
    folder.mkdir(parents=True, exist_ok=True)
    weights, description = _paths(folder, name)
    state = {k: v.detach().to("cpu").contiguous() for k, v in fuser.state_dict().items()}
    save_file(state, str(weights), metadata={"format": FUSER_FORMAT})
    description.write_text(json.dumps(asdict(fuser.spec), indent=2) + "\n")
    return weights, description


def load_fuser(folder: Path, name: str) -> CacheFuser:
    """The fuser saved under `name` in folder; FuserError when missing or not a knexa fuser."""
    weights, description = _paths(Path(folder), name)
    if not weights.is_file() or not description.is_file():
        raise FuserError(f"no fuser {name!r} in {folder}")
    try:
        raw = json.loads(description.read_text())
        if raw.get("format") != FUSER_FORMAT:
            raise FuserError(f"{description} is not a {FUSER_FORMAT} description")
        spec = FuserSpec(**raw)
    except (ValueError, TypeError) as exc:
        raise FuserError(f"bad fuser description {description}: {exc}") from None
    fuser = CacheFuser(spec)
    try:
        fuser.load_state_dict(load_file(str(weights)))
    except (RuntimeError, OSError, ValueError) as exc:
        raise FuserError(f"fuser weights {weights} do not match its description: {exc}") from None
    return fuser
