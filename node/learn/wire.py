"""The distillation protocol's RPC method and messages.

- `learn.transfer` (unary): the round's teacher sends its student the teacher's answers to the public transfer
  set. The body carries them as a detached signed payload (knexa.net.rpc.sign_payload, topic
  `learn.transfer`, addressed to the student), so the student can keep and re-verify what it trained on.
  Only prompts of the public set and generated answers travel: no weights, no private data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack
from pydantic import BaseModel, Field

METHOD_TRANSFER = "learn.transfer"
TRANSFER_TOPIC = "learn.transfer"
MAX_ITEMS = 256
MAX_PROMPT_CHARS = 2048
MAX_ANSWER_CHARS = 8192
MAX_PAYLOAD_BYTES = 2 * 1024 * 1024


class TransferCall(BaseModel):
    round_no: int = Field(ge=1)
    payload: bytes = Field(max_length=MAX_PAYLOAD_BYTES)


class TransferReply(BaseModel):
    accepted: bool
    detail: str = Field("", max_length=1024)


class TransferError(ValueError):
    """The transfer set is malformed."""


@dataclass(frozen=True)
class TransferSet:
    round_no: int
    teacher: str
    student: str
    items: tuple[tuple[str, str], ...]  # (public prompt, teacher's answer)

    def to_bytes(self) -> bytes:
        return msgpack.packb({"round": self.round_no, "teacher": self.teacher, "student": self.student,
                              "items": [list(i) for i in self.items]}, use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> TransferSet:
        try:
            raw: Any = msgpack.unpackb(data, raw=False, strict_map_key=True, max_str_len=MAX_ANSWER_CHARS * 4,
                                       max_array_len=MAX_ITEMS * 2)
        except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
            raise TransferError(f"the transfer set does not decode: {exc}") from None
        if not isinstance(raw, dict):
            raise TransferError("the transfer set must be a map")
        round_no, teacher, student, items = raw.get("round"), raw.get("teacher"), raw.get("student"), raw.get("items")
        if isinstance(round_no, bool) or not isinstance(round_no, int) or round_no < 1:
            raise TransferError("round must be a positive integer")
        if not isinstance(teacher, str) or not isinstance(student, str):
            raise TransferError("teacher and student must be peer ids")
        if not isinstance(items, list) or not 0 < len(items) <= MAX_ITEMS:
            raise TransferError(f"items must be a list of 1-{MAX_ITEMS} [prompt, answer] pairs")
        parsed = []
        for item in items:
            if not (isinstance(item, list) and len(item) == 2 and all(isinstance(v, str) for v in item)):
                raise TransferError("each item must be [prompt, answer], two strings")
            prompt, answer = item
            if not 0 < len(prompt) <= MAX_PROMPT_CHARS or len(answer) > MAX_ANSWER_CHARS:
                raise TransferError(f"prompts must have 1-{MAX_PROMPT_CHARS} and answers at most "
                                    f"{MAX_ANSWER_CHARS} characters")
            parsed.append((prompt, answer))
        return cls(round_no, teacher, student, tuple(parsed))
