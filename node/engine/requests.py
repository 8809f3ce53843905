"""What callers send to the engine and what they get back; validation without a model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidMessages, InvalidRequest
from .sampling import SamplingParams

ROLES = ("system", "user", "assistant", "tool")
MAX_MESSAGES = 1024


@dataclass(frozen=True)
class GenerationRequest:
    """Exactly one of `messages` (chat, rendered with the tokenizer's template), `prompt` (raw text)
    or `prompt_token_ids` is set. `adapter` names a loaded LoRA adapter; None uses the base model."""

    messages: Sequence[dict[str, Any]] | None = None
    prompt: str | None = None
    prompt_token_ids: Sequence[int] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = None

    def validate(self) -> GenerationRequest:
        given = [x is not None for x in (self.messages, self.prompt, self.prompt_token_ids)]
        if sum(given) != 1:
            raise InvalidRequest("give exactly one of messages, prompt or prompt_token_ids")
        if self.messages is not None:
            validate_messages(self.messages)
        if self.prompt is not None and not isinstance(self.prompt, str):
            raise InvalidRequest("prompt must be a string")
        if self.prompt_token_ids is not None:
            validate_token_ids(self.prompt_token_ids, "prompt_token_ids")
        if self.adapter is not None and (not isinstance(self.adapter, str) or not self.adapter):
            raise InvalidRequest("adapter must be a non-empty string or null")
        if not isinstance(self.params, SamplingParams):
            raise InvalidRequest("params must be SamplingParams")
        self.params.validate()
        return self


def validate_messages(messages: object) -> None:
    """Chat messages: a non-empty list of {"role": one of ROLES, "content": str}, nothing else."""
    if not isinstance(messages, list | tuple) or not messages:
        raise InvalidMessages("messages must be a non-empty list")
    if len(messages) > MAX_MESSAGES:
        raise InvalidMessages(f"at most {MAX_MESSAGES} messages are allowed")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidMessages(f"messages[{index}] must be an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise InvalidMessages(f"messages[{index}].role must be one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise InvalidMessages(f"messages[{index}].content must be a string")
        extra = set(message) - {"role", "content", "name"}
        if extra:
            raise InvalidMessages(f"messages[{index}] has unknown fields: {', '.join(sorted(extra))}")


def validate_token_ids(token_ids: object, name: str, vocab_size: int | None = None) -> list[int]:
    if not isinstance(token_ids, list | tuple) or not token_ids:
        raise InvalidRequest(f"{name} must be a non-empty list of integers")
    for token in token_ids:
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise InvalidRequest(f"{name} must hold non-negative integers")
        if vocab_size is not None and token >= vocab_size:
            raise InvalidRequest(f"{name} has token id {token} outside the vocabulary ({vocab_size})")
    return list(token_ids)


@dataclass(frozen=True)
class TextDelta:
    """A piece of streamed output: new text (may be empty while a stop string is pending) and its tokens."""

    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class GenerationResult:
    """The final record of a generation."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str  # "stop" (end-of-sequence token or stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    queue_time_s: float
    time_to_first_token_s: float
    total_time_s: float
    adapter: str | None = None

    @property
    def tokens_per_s(self) -> float:
        decode_time = self.total_time_s - self.time_to_first_token_s
        if self.completion_tokens <= 1 or decode_time <= 0:
            return 0.0
        return (self.completion_tokens - 1) / decode_time

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "token_ids": list(self.token_ids),
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "queue_time_s": self.queue_time_s,
            "time_to_first_token_s": self.time_to_first_token_s,
            "total_time_s": self.total_time_s,
            "tokens_per_s": self.tokens_per_s,
            "adapter": self.adapter,
        }


@dataclass(frozen=True)
class ScoreResult:
    """Per-position scores of `token_ids` (the scored tokens) given everything before each of them.

    logprobs[i] is log p(token_ids[i] | context); argmax_token_ids[i] is the model's top choice at that
    position and argmax_logprobs[i] its log-probability. A verifier compares argmax_token_ids with a
    claimed greedy output; a distiller uses logprobs."""

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    argmax_token_ids: tuple[int, ...]
    argmax_logprobs: tuple[float, ...]
    prompt_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "token_ids": list(self.token_ids),
            "logprobs": list(self.logprobs),
            "argmax_token_ids": list(self.argmax_token_ids),
            "argmax_logprobs": list(self.argmax_logprobs),
            "prompt_tokens": self.prompt_tokens,
        }
