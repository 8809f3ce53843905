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


_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


def check_adapter_weights(folder: Path, config: Any, base_model: Any) -> None:
    """Read the adapter's weights and match their shapes to the model before peft touches it: peft injects
    its layers first and fails after, leaving them behind; and a truncated file is the folder's fault
    (AdapterError), not a model failure (which makes the engine reload its weights)."""
    from safetensors import safe_open

    path = Path(folder) / "adapter_model.safetensors"
    if not path.is_file():
        raise AdapterError(f"{folder} holds no adapter_model.safetensors")
    try:  # the header only: it must cover the whole file, so a cut-short file fails here without a full read
        with safe_open(str(path), framework="pt") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as exc:  # safetensors' own error type, or OSError
        raise AdapterError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc
    modules = dict(base_model.named_modules())
    ranks: dict[str, int] = {}
    # With a rank pattern, ranks differ per module; then they only have to agree between A and B.
    config_rank = None if getattr(config, "rank_pattern", None) else config.r
    for key, shape in shapes.items():
        match = _LORA_KEY.match(key)
        if match is None:
            continue
        module = modules.get(match["module"])
        if module is None or len(shape) != 2:
            raise AdapterError(f"{path} does not fit this model: {key}")
        in_features, out_features = _features(module)
        if match["part"] == "A":  # (rank, in)
            rank, features, expected = shape[0], shape[1], in_features
        else:  # (out, rank)
            rank, features, expected = shape[1], shape[0], out_features
        if features != expected or ranks.setdefault(match["module"], rank) != rank or rank != (config_rank or rank):
            raise AdapterError(f"{path} does not fit this model: {key} has shape {shape} "
                               f"(its config says rank {config.r})")


def _features(module: Any) -> tuple[int, int]:
    if hasattr(module, "in_features"):  # nn.Linear
        return module.in_features, module.out_features
    weight = module.weight  # GPT-2's Conv1D stores (in, out)
    return weight.shape[0], weight.shape[1]


class AdapterSet:
    """The base model plus loaded adapters. peft wraps the base model on the first load and is removed
    again (without merging) when the last adapter is unloaded, so base-only serving pays nothing."""

    def __init__(self, base_model: Any) -> None:
        self.base_model = base_model
        self._peft: Any = None
        # None for adapters made in memory (created or trained here) and not saved since.
        self.folders: dict[str, Path | None] = {}
        # Hidden copies of replaced weights that running requests still decode with (see retire()).
        self.retired: set[str] = set()
        self._retired_count = 0

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
        except Exception as exc:  # whatever a malformed config makes peft raise is the folder's fault
            raise AdapterError(f"{folder} is not a peft adapter folder: {type(exc).__name__}: {exc}") from exc
        if not isinstance(config, LoraConfig):
            raise AdapterError(f"only LoRA adapters can be served per request, {folder} is {config.peft_type}")
        check_adapter_weights(folder, config, self.base_model)
        try:
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(self.base_model, str(folder), adapter_name=adapter_id)
            else:
                self._peft.load_adapter(str(folder), adapter_name=adapter_id)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as exc:
            raise AdapterError(f"cannot load adapter {adapter_id!r} from {folder}: {exc}") from exc
        self._peft.eval()
        self.folders[adapter_id] = folder

    def create(
        self, adapter_id: str, rank: int = 8, seed: int = 0, like: str | None = None, config: Any = None
    ) -> None:
        """A new LoRA adapter in memory: B starts at zero, so it changes nothing until trained. `like` copies
        another adapter's configuration (rank, targets), `config` takes a LoraConfig as it is."""
        self._check_new_id(adapter_id)
        self._add(adapter_id, rank, seed, like, config)
        self.folders[adapter_id] = None

    def _add(self, adapter_id: str, rank: int, seed: int, like: str | None, config: Any) -> None:
        import torch
        from peft import LoraConfig, get_peft_model

        if like is not None:
            config = copy.deepcopy(self._peft.peft_config[like])
        elif config is not None:
            config = copy.deepcopy(config)
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

    def config_of(self, adapter_id: str) -> Any:
        self.check(adapter_id)
        return self._peft.peft_config[adapter_id]

    def parameters_of(self, adapter_id: str) -> dict[str, Any]:
        """The adapter's LoRA tensors by name with the adapter id taken out (same keys for every adapter)."""
        self.check(adapter_id)
        return self._tensors(adapter_id)

    def _tensors(self, adapter_id: str) -> dict[str, Any]:
        marker = f".{adapter_id}."
        return {
            name.replace(marker, ".@."): parameter
            for name, parameter in self._peft.named_parameters()
            if marker in name and "lora_" in name
        }

    def copy_weights(self, source: str, target: str) -> None:
        """Overwrite target's LoRA tensors with source's, in place (callers see the change at once)."""
        self.check(source)
        self.check(target)
        self._copy(self._tensors(source), target)

    def _copy(self, src: dict[str, Any], target: str) -> None:
        import torch

        dst = self._tensors(target)
        if src.keys() != dst.keys() or any(src[k].shape != dst[k].shape for k in src):
            raise AdapterError(f"adapter {target!r} has another shape than the weights copied into it")
        with torch.no_grad():
            for name, tensor in src.items():
                dst[name].copy_(tensor)

    def same_shape(self, first: str, second: str) -> bool:
        a, b = self.parameters_of(first), self.parameters_of(second)
        return a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)

    def is_finite(self, adapter_id: str) -> bool:
        import torch

        return all(bool(torch.isfinite(t).all()) for t in self.parameters_of(adapter_id).values())

    def retire(self, adapter_id: str) -> str:
        """A hidden copy of the adapter's current weights, under a name no request can use: requests already
        decoding with the adapter switch to it before its weights are replaced, and so finish with the weights
        they started on. drop_retired() removes it once no request uses it."""
        self.check(adapter_id)
        self._retired_count += 1
        hidden = f"{adapter_id}~{self._retired_count}"  # '~' is not allowed in adapter ids
        self._add(hidden, 0, 0, adapter_id, None)
        self.retired.add(hidden)
        self._copy(self._tensors(adapter_id), hidden)
        return hidden

    def drop_retired(self, in_use: set[str | None]) -> None:
        for hidden in sorted(self.retired - in_use):
            self.retired.discard(hidden)
            self._peft.delete_adapter(hidden)
        if self._peft is not None and not self.folders and not self.retired:
            self.base_model = self._peft.unload()
            self._peft = None

    def snapshot(self, adapter_id: str) -> tuple[Any, dict[str, Any]]:
        """The adapter's configuration and a CPU copy of its tensors, for restore() into a reloaded model."""
        return copy.deepcopy(self.config_of(adapter_id)), {
            name: tensor.detach().to("cpu", copy=True) for name, tensor in self.parameters_of(adapter_id).items()
        }

    def restore(self, adapter_id: str, config: Any, tensors: dict[str, Any]) -> None:
        self.create(adapter_id, config=config)
        self._copy(tensors, adapter_id)

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
        if not self.folders and not self.retired:
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
