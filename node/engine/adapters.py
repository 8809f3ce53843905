"""LoRA adapters kept beside the base weights (never merged), chosen per batch row."""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import AdapterError, UnknownAdapter

BASE = "__base__"  # peft's name for "no adapter" in a mixed-adapter batch
# peft names modules after adapters, and module names cannot hold a '.'.
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


class AdapterSet:
    """The base model plus loaded adapters. peft wraps the base model on the first load and is removed
    again (without merging) when the last adapter is unloaded, so base-only serving pays nothing."""

    def __init__(self, base_model: Any) -> None:
        self.base_model = base_model
        self._peft: Any = None
        # None for adapters made in memory (created or trained here) and not saved since.
        self.folders: dict[str, Path | None] = {}

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

        self._check_new_id(adapter_id)
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

    def create(self, adapter_id: str, rank: int = 8, seed: int = 0, like: str | None = None) -> None:
        """A new LoRA adapter in memory: B starts at zero, so it changes nothing until trained. `like` copies
        another adapter's configuration (rank, targets) instead."""
        import torch
        from peft import LoraConfig, get_peft_model

        self._check_new_id(adapter_id)
        if like is not None:
            self.check(like)
            config = copy.deepcopy(self._peft.peft_config[like])
        else:
            targets = guess_target_modules(self.base_model)
            config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0,
                                fan_in_fan_out="c_attn" in targets)
        config.inference_mode = False
        torch.manual_seed(seed)
        try:
            if self._peft is None:
                self._peft = get_peft_model(self.base_model, config, adapter_name=adapter_id)
            else:
                self._peft.add_adapter(adapter_id, config)
        except (ValueError, KeyError, RuntimeError, TypeError) as exc:
            raise AdapterError(f"cannot create adapter {adapter_id!r}: {exc}") from exc
        self._peft.eval()
        self.folders[adapter_id] = None

    def parameters_of(self, adapter_id: str) -> dict[str, Any]:
        """The adapter's LoRA tensors by name with the adapter id taken out (same keys for every adapter)."""
        self.check(adapter_id)
        marker = f".{adapter_id}."
        return {
            name.replace(marker, ".@."): parameter
            for name, parameter in self._peft.named_parameters()
            if marker in name and "lora_" in name
        }

    def copy_weights(self, source: str, target: str) -> None:
        """Overwrite target's LoRA tensors with source's, in place (callers see the change at once)."""
        import torch

        src, dst = self.parameters_of(source), self.parameters_of(target)
        if src.keys() != dst.keys() or any(src[k].shape != dst[k].shape for k in src):
            raise AdapterError(f"adapters {source!r} and {target!r} have different shapes")
        with torch.no_grad():
            for name, tensor in src.items():
                dst[name].copy_(tensor)

    def save(self, adapter_id: str, folder: Path) -> None:
        import shutil
        import tempfile

        self.check(adapter_id)
        folder.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder.parent) as scratch:
            self._peft.save_pretrained(scratch, selected_adapters=[adapter_id])
            # peft puts every adapter but "default" in a subfolder named after it.
            saved = Path(scratch) / adapter_id if adapter_id != "default" else Path(scratch)
            staged = folder.with_name(folder.name + ".new")
            shutil.rmtree(staged, ignore_errors=True)
            shutil.move(str(saved), staged)
            shutil.rmtree(folder, ignore_errors=True)
            staged.rename(folder)
        self.folders[adapter_id] = folder

    def _check_new_id(self, adapter_id: str) -> None:
        if not _ID.match(adapter_id) or adapter_id == BASE:
            raise AdapterError(f"adapter id {adapter_id!r} must be 1-64 letters, digits, '_' or '-'")
        if adapter_id in self.folders:
            raise AdapterError(f"adapter {adapter_id!r} is already loaded")

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


def guess_target_modules(model: Any) -> list[str]:
    """The attention projections that LoRA adapts, by the names this architecture gives them."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if {"q_proj", "k_proj", "v_proj", "o_proj"} <= names:
        return ["q_proj", "k_proj", "v_proj", "o_proj"]
    if "c_attn" in names:
        return ["c_attn", "c_proj"]  # GPT-2 style fused attention projections
    raise AdapterError("cannot guess the attention projections of this model")


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
    if target_modules is None:
        target_modules = guess_target_modules(base)
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
