"""Finding the exception that matters inside trio's exception groups."""

from __future__ import annotations

from typing import TypeVar

E = TypeVar("E", bound=BaseException)


def find_exception(exc: BaseException, kinds: type[E] | tuple[type[E], ...]) -> E | None:
    """The first exception of `kinds` in `exc`, looking through nested groups."""
    if isinstance(exc, kinds):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = find_exception(inner, kinds)
            if found is not None:
                return found
    return None
