"""The request-body cap, enforced on the bytes received (chunked bodies too).

A `Content-Length` over the cap is refused before anything is read. Otherwise the ASGI
`receive` channel is wrapped: the bytes are counted as they arrive, and the message that
crosses the cap raises a 413 instead of being handed on, so nothing past the cap is read
(the server then drops the connection, as it does for any body left unread).
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lorafold.server.api.errors import error_body


class BodyTooLargeError(HTTPException):
    """Raised from `receive` when a body crosses its cap; the app's handlers answer 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds the cap of {limit} bytes; send a smaller body")


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int]) -> None:
        self.app = app
        self.limit_for = limit_for  # request path -> cap in bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        length = _content_length(scope)
        if length is not None and length > limit:
            body = error_body(f"request body of {length} bytes exceeds the cap of {limit}; send a smaller body",
                              "invalid_request_error", 413)
            await JSONResponse(body, status_code=413)(scope, receive, send)
            return
        received = 0

        async def capped_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLargeError(limit)
            return message

        await self.app(scope, capped_receive, send)


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            return int(value) if value.isdigit() else None
    return None
