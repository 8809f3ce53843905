"""A loaded model with its tokenizer, identity and adapters, and the model-bound request preparation."""

from __future__ import annotations

import contextlib
import fcntl
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from knexa.node.paths import write_json_atomically

from .adapters import AdapterSet
from .config import EMBEDDED_MODEL, EngineConfig
from .device import choose_device, choose_dtype, dtype_name, faster_on_cpu, parse_dtype
from .errors import ContextLengthExceeded, InvalidMessages, InvalidRequest
from .forward_cache import cache_kwargs, output_cache
from .identity import ModelIdentity, tokenizer_sha256, weights_sha256
from .kvbatch import build_cache, cache_pairs
from .models import load_model_and_tokenizer, resolve_model_folder
from .requests import GenerationRequest, validate_token_ids


def chat_prompt_ids(tokenizer: Any, messages: Sequence[dict[str, Any]], model_name: str) -> list[int]:
    """The prompt token ids of a chat, as the engine feeds them to the model."""
    if not tokenizer.chat_template:
        raise InvalidMessages(f"model {model_name} has no chat template; send a raw prompt")
    try:
        text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # template errors are jinja exceptions of many kinds
        raise InvalidMessages(f"the chat template rejected the messages: {exc}") from exc
    return text_prompt_ids(tokenizer, text, special=False)  # the template already placed any BOS token


def text_prompt_ids(tokenizer: Any, text: str, special: bool) -> list[int]:
    ids = tokenizer(text, add_special_tokens=special)["input_ids"]
    if not ids:
        raise InvalidRequest("the prompt is empty after tokenization")
    return list(ids)


@dataclass
class ModelState:
    folder: Path
    model: Any
    tokenizer: Any
    identity: ModelIdentity
    device: torch.device
    dtype: torch.dtype
    eos_token_ids: frozenset[int]
    adapters: AdapterSet
    load_time_s: float = 0.0
    adapter_ids: tuple[str, ...] = field(default_factory=tuple)  # a copy the trio side may read any time

    @property
    def runnable(self) -> Any:
        return self.adapters.model

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    # Request preparation -------------------------------------------------------------------------

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        if request.prompt_token_ids is not None:
            return validate_token_ids(request.prompt_token_ids, "prompt_token_ids", self.identity.vocab_size)
        if request.messages is not None:
            return self.chat_ids(request.messages)
        return self.text_ids(request.prompt or "", special=True)

    def chat_ids(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        return chat_prompt_ids(self.tokenizer, messages, self.identity.name)

    def text_ids(self, text: str, special: bool) -> list[int]:
        return text_prompt_ids(self.tokenizer, text, special)

    def token_ids_of(self, value: str | Sequence[int], name: str, special: bool) -> list[int]:
        """Text or token ids as token ids; empty text or an empty list gives []."""
        if isinstance(value, str):
            return self.text_ids(value, special) if value else []
        if isinstance(value, list | tuple) and not value:
            return []
        return validate_token_ids(value, name, self.identity.vocab_size)

    def check_context(self, prompt_tokens: int, max_new_tokens: int) -> None:
        limit = self.identity.context_length
        if prompt_tokens + max_new_tokens > limit:
            raise ContextLengthExceeded(
                f"{prompt_tokens} prompt tokens + max_new_tokens {max_new_tokens} exceed the context of "
                f"{limit} tokens of {self.identity.name}"
            )

    # Model calls ---------------------------------------------------------------------------------

    def forward_prompt(
        self,
        token_ids: Sequence[int],
        past: Sequence[tuple[torch.Tensor, torch.Tensor]] | None,
        adapter: str | None,
        logits_to_keep: int = 1,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Run token_ids (one row) on top of an optional cache; last logits_to_keep logits and the cache."""
        start = past[0][0].shape[-2] if past else 0
        input_ids = torch.tensor([list(token_ids)], device=self.device)
        positions = torch.arange(start, start + len(token_ids), device=self.device).unsqueeze(0)
        output = self.runnable(
            input_ids=input_ids,
            position_ids=positions,
            **cache_kwargs(self.model, build_cache(past, self.model.config)),
            use_cache=True,
            logits_to_keep=logits_to_keep,
            **self.adapters.forward_kwargs([adapter]),
        )
        return output.logits[0], cache_pairs(output_cache(output))


def load_model_state(config: EngineConfig, reuse_identity: ModelIdentity | None = None) -> ModelState:
    started = time.monotonic()
    folder = resolve_model_folder(config)
    device = choose_device(config.device)
    # A reload after a crash keeps the dtype measured at first load: imported caches must keep matching.
    dtype = parse_dtype(reuse_identity.dtype) if reuse_identity else choose_dtype(config.dtype, device)
    model, tokenizer = load_model_and_tokenizer(folder, dtype or torch.float32, device)
    if dtype is None:
        model = _measured_cpu_choice(model, folder, config)
        dtype = model.dtype
    identity = reuse_identity or _identify(folder, model, tokenizer, dtype, config)
    eos = _eos_token_ids(model, tokenizer)
    state = ModelState(folder, model, tokenizer, identity, device, dtype, eos, AdapterSet(model))
    state.load_time_s = time.monotonic() - started
    return state


CHOICE_LOCK_TIMEOUT_S = 300.0


def _measured_cpu_choice(model: Any, folder: Path, config: EngineConfig) -> Any:
    """float32 or bfloat16, whichever decodes faster here. Measuring takes seconds (bf16 kernels are set up
    on first use), so the answer is remembered per model folder, CPU, thread count and torch version."""
    import json
    import platform

    choices_file = config.models_dir / "cpu-dtype-choices.json"
    weights = sorted(p.stat().st_size for p in folder.iterdir() if p.suffix == ".safetensors")
    key = "|".join(
        [str(folder.resolve()), str(weights), platform.processor() or platform.machine(), _cpu_model(),
         str(torch.get_num_threads()), torch.__version__]
    )
    # Engines that start together (a testnet's daemons share this folder) measure one at a time, so the
    # first one's choice is every later one's: timings taken side by side disagree, and so would the dtypes.
    with _exclusive(choices_file.with_suffix(".lock"), CHOICE_LOCK_TIMEOUT_S):
        try:
            choices = json.loads(choices_file.read_text())
        except (OSError, ValueError):
            choices = {}
        if choices.get(key) == "float32":
            return model
        if choices.get(key) == "bfloat16":
            return model.to(torch.bfloat16)
        chosen = faster_on_cpu(model)
        choices[key] = dtype_name(chosen.dtype)
        try:
            write_json_atomically(choices_file, choices, indent=1)
        except OSError:
            pass  # not remembering only costs the measurement again next time
        return chosen


@contextlib.contextmanager
def _exclusive(lock_file: Path, timeout_s: float) -> Iterator[None]:
    """An advisory lock across processes (and threads: each takes its own open file). If it cannot be had
    in time (or at all, e.g. a read-only folder), the caller goes on without it."""
    try:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        handle = lock_file.open("a")
    except OSError:
        yield
        return
    with handle:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    yield
                    return
                time.sleep(0.1)  # on the engine's worker thread, never the event loop
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown-cpu"


def _identify(folder: Path, model: Any, tokenizer: Any, dtype: torch.dtype, config: EngineConfig) -> ModelIdentity:
    # One token through the model gives the cache layout exactly, whatever the config calls its fields.
    probe = torch.tensor([[tokenizer.eos_token_id or 0]], device=model.device)
    with torch.no_grad():
        cache = output_cache(model(input_ids=probe, use_cache=True, logits_to_keep=1))
    keys = cache.layers[0].keys
    model_config = model.config
    context = getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
    name = EMBEDDED_MODEL if config.is_embedded else folder.name
    return ModelIdentity(
        name=name,
        architecture=(model_config.architectures or [type(model).__name__])[0],
        parameters=sum(p.numel() for p in model.parameters()),
        dtype=dtype_name(dtype),
        weights_sha256=weights_sha256(folder),
        tokenizer_sha256=tokenizer_sha256(tokenizer),
        num_layers=len(cache.layers),
        num_kv_heads=int(keys.shape[1]),
        head_dim=int(keys.shape[-1]),
        context_length=int(context or 2048),
        vocab_size=int(model.get_output_embeddings().weight.shape[0]),
    )


def _eos_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)
