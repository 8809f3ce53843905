"""The learning service's one error type, light so that the local API imports it without torch."""

from __future__ import annotations


class LearnError(Exception):
    """`code`: bad_request (the data file), busy, unavailable (no model)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
