"""One short, human reason for a failed network operation."""

from __future__ import annotations

from collections.abc import Iterator


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and everything it wraps, breadth first, each once."""
    queue, seen = [exc], set()
    while queue:
        current = queue.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        # py-libp2p wraps dial failures in MultiError(.errors) without chaining.
        queue.extend(getattr(current, "errors", None) or [])
        queue.extend(getattr(current, "exceptions", None) or [])
        for linked in (current.__cause__, current.__context__):
            if linked is not None:
                queue.append(linked)


def failure_reason(exc: BaseException) -> str:
    """The operating system's reason if there is one, else the innermost message."""
    innermost = exc
    for cause in _causes(exc):
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror.lower()
        if isinstance(cause, TimeoutError):
            return "timed out"
        innermost = cause
    text = " ".join(str(innermost).split()) or type(innermost).__name__
    return text[:200]
