"""Typed RPC errors: every failure reaches the caller as an `RpcError` with a code."""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    OK = 0
    UNKNOWN_METHOD = 1
    BAD_REQUEST = 2
    OVERLOADED = 3
    DEADLINE_EXCEEDED = 4
    UNAUTHORIZED = 5
    INTERNAL = 6
    CANCELLED = 7
    UNAVAILABLE = 8
    PROTOCOL_ERROR = 9
    MESSAGE_TOO_LARGE = 10

    @classmethod
    def parse(cls, value: object) -> ErrorCode:
        """The code for a wire value; unknown values become INTERNAL."""
        try:
            return cls(int(value))  # type: ignore[call-overload]
        except (TypeError, ValueError):
            return cls.INTERNAL


class RpcError(Exception):
    """A call failed; `code` says why, `message` gives detail for humans."""

    def __init__(self, code: ErrorCode, message: str = "") -> None:
        super().__init__(f"{code.name}: {message}" if message else code.name)
        self.code = code
        self.message = message


class CodecError(ValueError):
    """Bytes that do not decode: the single error every codec in this package raises."""


class FrameTooLarge(CodecError):
    """A length prefix announced more bytes than the configured maximum."""
