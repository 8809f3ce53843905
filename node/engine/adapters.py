"""LoRA adapters kept beside the base weights (never merged), chosen per batch row."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import AdapterError, UnknownAdapter

BASE = "__base__"  # peft's name for "no adapter" in a mixed-adapter batch
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class AdapterSet:
    """The base model plus loaded adapters. peft wraps the base model on the first load and is removed
    again (without merging) when the last adapter is unloaded, so base-only serving pays nothing."""

    def __init__(self, base_model: Any) -> None:
        self.base_model = base_model
        self._peft: Any = None
        self.folders: dict[str, Path] = {}

    @property
    def model(self) -> Any:
        return self._peft if self._peft is not None else self.base_model

    def ids(self) -> list[str]:
        return sorted(self.folders)

    def check(self, adapter: str | None) -> None:
        if adapter is not None and adapter not in self.folders:
            raise UnknownAdapter(f"adapter {adapter!r} is not loaded (loaded: {', '.join(self.ids()) or 'none'})")

    def load(self, adapter_id: str, folder: Path) -> None:
        from peft import LoraConfig, PeftConfig, PeftModel

        if not _ID.match(adapter_id) or adapter_id == BASE:
            raise AdapterError(f"adapter id {adapter_id!r} must be 1-64 letters, digits, '.', '_' or '-'")
        if adapter_id in self.folders:
            raise AdapterError(f"adapter {adapter_id!r} is already loaded")
        try:
            config = PeftConfig.from_pretrained(str(folder))
        except (OSError, ValueError) as exc:
            raise AdapterError(f"{folder} is not a peft adapter folder: {exc}") from exc
        if not isinstance(config, LoraConfig):
            raise AdapterError(f"only LoRA adapters can be served per request, {folder} is {config.peft_type}")
        try:
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(self.base_model, str(folder), adapter_name=adapter_id)
            else:
                self._peft.load_adapter(str(folder), adapter_name=adapter_id)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise AdapterError(f"cannot load adapter {adapter_id!r} from {folder}: {exc}") from exc
        self._peft.eval()
        self.folders[adapter_id] = folder

    def unload(self, adapter_id: str) -> None:
        self.check(adapter_id)
        del self.folders[adapter_id]
        if not self.folders:
            # unload() strips the LoRA layers and hands back the untouched base modules.
            self.base_model = self._peft.unload()
            self._peft = None
        else:
            self._peft.delete_adapter(adapter_id)

    def forward_kwargs(self, adapters: Sequence[str | None]) -> dict[str, Any]:
        """Extra forward arguments selecting each row's adapter; none when peft is not in use."""
        if self._peft is None:
            return {}
        return {"adapter_names": [a if a is not None else BASE for a in adapters]}


def create_random_lora_adapter(
    base_folder: Path,
    out_dir: Path,
    *,
    rank: int = 8,
    seed: int = 0,
    b_std: float = 0.05,
    target_modules: Sequence[str] | None = None,
) -> Path:
    """Write a LoRA adapter with random weights for base_folder's model into out_dir (for tests and
    benchmarks). peft starts B at zero, which would leave outputs unchanged, so B is drawn at random too."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    names = {name.rsplit(".", 1)[-1] for name, _ in base.named_modules()}
    if target_modules is None:
        if {"q_proj", "k_proj", "v_proj", "o_proj"} <= names:
            target_modules = ["q_proj", "k_proj", "v_proj", "o_proj"]
        elif "c_attn" in names:
            target_modules = ["c_attn", "c_proj"]  # GPT-2 style fused attention projections
        else:
            raise ValueError("cannot guess the attention projections; pass target_modules")
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=list(target_modules),
        lora_dropout=0.0,
        fan_in_fan_out="c_attn" in target_modules,
    )
    torch.manual_seed(seed)
    model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * b_std)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    return out_dir
