"""The collaboration protocol's RPC methods and messages (signed by the RPC layer; no torch needed).

- `collab.propose` (unary): run one proposer (or aggregator) job on the callee's model. A node over its
  admission bound answers OVERLOADED with `retry_after_s=<seconds>` in the message.
- `collab.bid` (unary): a task beacon; the callee answers with its self-score for the requirement vector and
  its load.
"""

from __future__ import annotations

import math
import re

from pydantic import BaseModel, Field, field_validator

from knexa.node.inference_wire import GenerateParams, Message

METHOD_PROPOSE = "collab.propose"
METHOD_BID = "collab.bid"
MAX_MESSAGES = 64
MAX_REQUIREMENT = 64
MAX_TEXT_CHARS = 64 * 1024
_RETRY_AFTER = re.compile(r"retry_after_s=([0-9]+(?:\.[0-9]+)?)")


class ProposeCall(BaseModel):
    round_id: str = Field(min_length=1, max_length=64)
    layer: int = Field(ge=0, le=16)
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    params: GenerateParams = Field(default_factory=GenerateParams)


class ProposeReply(BaseModel):
    # Bounded: the reply comes from a peer, and its text goes into the next layer's prompt.
    text: str = Field(max_length=MAX_TEXT_CHARS)
    token_ids: list[int] = Field(max_length=8192)
    model: str = Field(max_length=256)
    # Weights, tokenizer and dtype (ModelIdentity.fingerprint): what verification matches, not the name.
    model_fingerprint: str = Field("", max_length=128)
    finish_reason: str = Field(max_length=32)
    queue_time_s: float
    service_time_s: float


class BidCall(BaseModel):
    task_id: str = Field(min_length=1, max_length=64)
    requirement: dict[str, float] = Field(max_length=MAX_REQUIREMENT)

    @field_validator("requirement")
    @classmethod
    def _finite(cls, value: dict[str, float]) -> dict[str, float]:
        for name, weight in value.items():
            if not 0 < len(name) <= 64 or not math.isfinite(weight) or weight < 0:
                raise ValueError("requirement weights must be finite, non-negative, with names of 1-64 characters")
        return value


class BidReply(BaseModel):
    score: float = Field(ge=-1, le=1)
    queue_length: int = Field(ge=0)
    model: str | None = None


def overloaded_message(retry_after_s: float, reason: str) -> str:
    return f"retry_after_s={retry_after_s:.3f} {reason}"


def retry_after_of(message: str) -> float | None:
    """The retry-after an OVERLOADED error carries, if any."""
    found = _RETRY_AFTER.search(message)
    return float(found.group(1)) if found else None
