"""Handler registration: method name -> handler, kind and schemas."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class CallKind(StrEnum):
    UNARY = "unary"
    SERVER_STREAM = "server_stream"
    CLIENT_STREAM = "client_stream"


@dataclass(frozen=True, slots=True)
class MethodSpec:
    """How a method is served.

    Handlers take ``(request, ctx)``:
    - unary: ``async (request, ctx) -> response``
    - server_stream: ``async (request, ctx) -> None``, emitting items with ``await ctx.send(item)``
    - client_stream: ``async (requests, ctx) -> response``, where ``requests`` is an async
      iterator of validated items.
    """

    name: str
    handler: Callable[..., Any]
    kind: CallKind
    request_model: Any = None
    response_model: Any = None


class MethodRegistry:
    def __init__(self) -> None:
        self._methods: dict[str, MethodSpec] = {}

    def register(self, spec: MethodSpec) -> None:
        if not spec.name or len(spec.name) > 256:
            raise ValueError("method names must be 1..256 characters")
        if spec.name in self._methods:
            raise ValueError(f"method {spec.name!r} is already registered")
        self._methods[spec.name] = spec

    def get(self, name: str) -> MethodSpec | None:
        return self._methods.get(name)

    def names(self) -> list[str]:
        return sorted(self._methods)
