"""Incremental detokenization with stop strings; pure code, the tokenizer's decode is passed in.

Decoding token by token breaks multi-byte characters and merges, so the text is decoded from a short
window of recent tokens and only the part that is final is released. Text that could be the start of a
stop string is held back until it is either completed (the generation stops there, the stop string is
not emitted) or ruled out."""

from __future__ import annotations

from collections.abc import Callable, Sequence

Decode = Callable[[Sequence[int]], str]
REPLACEMENT = "\ufffd"


class TextStream:
    def __init__(self, decode: Decode, stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stop = tuple(stop)
        self._tokens: list[int] = []
        self._prefix_offset = 0  # window start: tokens before it are decoded into self._text for good
        self._read_offset = 0  # tokens up to here are reflected in self._text
        self._text = ""  # decoded text, final, possibly partly held back
        self._emitted = 0  # how many characters of self._text were released
        self.stopped = False

    @property
    def text(self) -> str:
        """All text released so far."""
        return self._text[: self._emitted]

    def push(self, token: int) -> str:
        """Add one token; return the newly released text (possibly empty). Sets `stopped` on a stop string."""
        if self.stopped:
            return ""
        self._tokens.append(token)
        window_before = self._decode(self._tokens[self._prefix_offset : self._read_offset])
        window_now = self._decode(self._tokens[self._prefix_offset :])
        if window_now.endswith(REPLACEMENT) or len(window_now) <= len(window_before):
            return ""  # an incomplete character or a merge still in progress: wait for more tokens
        self._text += window_now[len(window_before) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._tokens)
        return self._release(final=False)

    def finish(self) -> str:
        """The generation ended for another reason: release whatever is still held back."""
        if not self.stopped and self._read_offset < len(self._tokens):
            window_before = self._decode(self._tokens[self._prefix_offset : self._read_offset])
            window_now = self._decode(self._tokens[self._prefix_offset :])
            self._text += window_now[len(window_before) :]
            self._read_offset = len(self._tokens)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        search_from = max(0, self._emitted - max((len(s) for s in self._stop), default=0))
        cut = self._earliest_stop(search_from)
        if cut is not None:
            self.stopped = True
            released = self._text[self._emitted : cut]
            self._text = self._text[:cut]
            self._emitted = cut
            return released
        end = len(self._text) if final else len(self._text) - self._pending_stop_prefix()
        end = max(end, self._emitted)
        released = self._text[self._emitted : end]
        self._emitted = end
        return released

    def _earliest_stop(self, search_from: int) -> int | None:
        found = [i for i in (self._text.find(s, search_from) for s in self._stop) if i >= 0]
        return min(found) if found else None

    def _pending_stop_prefix(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        longest = 0
        for stop in self._stop:
            for size in range(min(len(stop) - 1, len(self._text)), longest, -1):
                if self._text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
