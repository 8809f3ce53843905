"""Sampling parameters and their validation; pure code, no torch."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidRequest

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 means greedy; top_k 0 and top_p 1 mean no truncation."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_new_tokens: int = 128
    stop: tuple[str, ...] = field(default_factory=tuple)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> SamplingParams:
        """Return self when every field is in range; raise InvalidRequest naming the bad field otherwise."""
        _number("temperature", self.temperature, 0.0, 100.0)
        _number("top_p", self.top_p, 0.0, 1.0)
        if self.top_p == 0.0:
            raise InvalidRequest("top_p must be greater than 0")
        _integer("top_k", self.top_k, 0, 1 << 30)
        if self.seed is not None:
            _integer("seed", self.seed, 0, (1 << 63) - 1)
        _integer("max_new_tokens", self.max_new_tokens, 1, 1 << 20)
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) for s in self.stop):
            raise InvalidRequest("stop must be a list of strings")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequest(f"at most {MAX_STOP_STRINGS} stop strings are allowed")
        if any(not s or len(s) > MAX_STOP_LENGTH for s in self.stop):
            raise InvalidRequest(f"stop strings must be 1 to {MAX_STOP_LENGTH} characters long")
        return self

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SamplingParams:
        """Build from a JSON/msgpack-style mapping (as the HTTP API and RPC receive it)."""
        known = {"temperature", "top_p", "top_k", "seed", "max_new_tokens", "stop"}
        unknown = set(data) - known
        if unknown:
            raise InvalidRequest(f"unknown sampling fields: {', '.join(sorted(unknown))}")
        values = dict(data)
        stop = values.get("stop", ())
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, list | tuple):
            raise InvalidRequest("stop must be a string or a list of strings")
        values["stop"] = tuple(stop)
        return cls(**values).validate()


def _number(name: str, value: object, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidRequest(f"{name} must be a finite number")
    if not low <= value <= high:
        raise InvalidRequest(f"{name} must be between {low} and {high}")


def _integer(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{name} must be an integer")
    if not low <= value <= high:
        raise InvalidRequest(f"{name} must be between {low} and {high}")
