"""A cap on the size of a request body to the local API, as ASGI middleware.

Starlette reads a whole body into memory before a route sees it, and FastAPI then parses all of it: without a
cap, one oversized POST holds the daemon's memory. Bodies announced larger than the cap are refused before any
is read; a body without a length (chunked) is refused as soon as it has gone past it (the route reading it
gets an HTTPException, which FastAPI answers with 413).
"""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_REQUEST_BYTES = 16 * 1024 * 1024


def announced_length(scope: Scope) -> int | None:
    """The request's Content-Length, or None when it has none (or one that is not a number)."""
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int = MAX_REQUEST_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = announced_length(scope)
        if length is not None and length > self.max_bytes:
            await self._refuse(send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, self._reason())
            return message

        await self.app(scope, counting_receive, send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps({"detail": self._reason()}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    def _reason(self) -> str:
        return f"request body larger than {self.max_bytes} bytes"
