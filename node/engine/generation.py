"""One request's progress through generation: tokens in, text deltas out, when to stop; pure code."""

from __future__ import annotations

import time
from collections.abc import Collection

from .requests import GenerationResult, TextDelta
from .sampling import SamplingParams
from .stops import Decode, TextStream


class RowProgress:
    def __init__(
        self,
        prompt_tokens: int,
        params: SamplingParams,
        eos_token_ids: Collection[int],
        decode: Decode,
        adapter: str | None,
        submitted_at: float,
        admitted_at: float,
    ) -> None:
        self.prompt_tokens = prompt_tokens
        self.params = params
        self.adapter = adapter
        self._eos = frozenset(eos_token_ids)
        self._stream = TextStream(decode, params.stop)
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.submitted_at = submitted_at
        self.admitted_at = admitted_at
        self.first_token_at: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def accept(self, token: int, now: float | None = None) -> TextDelta:
        """Record one sampled token; returns the text it releases. Sets finish_reason when done."""
        if self.finished:
            raise RuntimeError("token after the end of generation")
        if self.first_token_at is None:
            self.first_token_at = time.monotonic() if now is None else now
        if token in self._eos:
            self.finish_reason = "stop"
            return TextDelta(self._stream.finish(), ())
        self.token_ids.append(token)
        text = self._stream.push(token)
        if self._stream.stopped:
            self.finish_reason = "stop"
        elif len(self.token_ids) >= self.params.max_new_tokens:
            self.finish_reason = "length"
            text += self._stream.finish()
        return TextDelta(text, (token,))

    def result(self, now: float | None = None) -> GenerationResult:
        now = time.monotonic() if now is None else now
        first = self.first_token_at if self.first_token_at is not None else now
        return GenerationResult(
            text=self._stream.text,
            token_ids=tuple(self.token_ids),
            finish_reason=self.finish_reason or "length",
            prompt_tokens=self.prompt_tokens,
            completion_tokens=len(self.token_ids),
            queue_time_s=self.admitted_at - self.submitted_at,
            time_to_first_token_s=first - self.submitted_at,
            total_time_s=now - self.submitted_at,
            adapter=self.adapter,
        )
