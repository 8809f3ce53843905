"""Finding the exception that matters inside trio's exception groups."""

from __future__ import annotations

from collections.abc import Iterator
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


def describe(exc: BaseException) -> str:
    """`Type: message` of the first exception in `exc` that is not a group (what a person needs to read),
    and how many more came with it."""
    leaves = list(_leaves(exc))  # never empty: an exception group holds at least one exception
    first = leaves[0]
    text = f"{type(first).__name__}: {first}"
    return text + (f" (and {len(leaves) - 1} more)" if len(leaves) > 1 else "")


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc
