"""Typed errors raised by the lorafold clients.

Every HTTP error body from the server is ``{"error": {"message", "type", "code"}}``; the
client turns it into one of the classes below, keeping the server's message verbatim.

    LorafoldError                 base; also raised for statuses without a subclass (500, ...)
    ├── AuthenticationError       401, 403
    ├── NotFoundError             404
    ├── BadRequestError           400, 409, 413, 422
    ├── RateLimitError            429   (.retry_after: seconds from Retry-After, or None)
    ├── ServerUnavailableError    503   (.retry_after as above)
    └── APIConnectionError        no HTTP response at all (refused, reset, DNS, ...)
        └── APITimeoutError       connect / read / write timed out
"""

from __future__ import annotations

import email.utils
import json
import time

import httpx


class LorafoldError(Exception):
    """Base class of every error the lorafold clients raise.

    status_code: HTTP status, or None when no response arrived (connection errors) or the
        error came inside a stream.
    message: the server's message (or a description of the transport failure).
    type: the server's error type string (e.g. "invalid_request_error"), or None.
    code: the server's error code, or None.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        type: str | None = None,  # noqa: A002 - mirrors the wire field name
        code: int | str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.type = type
        self.code = code

    def __str__(self) -> str:
        if self.status_code is None:
            return self.message
        kind = f" {self.type}" if self.type else ""
        return f"{self.status_code}{kind}: {self.message}"


class AuthenticationError(LorafoldError):
    """401 / 403: the key is missing, wrong, or lacks the admin right for this route."""


class NotFoundError(LorafoldError):
    """404: unknown model, adapter or route."""


class BadRequestError(LorafoldError):
    """400 / 409 / 413 / 422: the request was refused as invalid; retrying will not help."""


class RateLimitError(LorafoldError):
    """429: the server's queue is full. `retry_after` is the server's hint in seconds (or None)."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.retry_after = retry_after


class ServerUnavailableError(LorafoldError):
    """503: the server is starting, draining or overloaded. `retry_after` as for 429."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.retry_after = retry_after


class APIConnectionError(LorafoldError):
    """No HTTP response: connection refused or reset, DNS failure, protocol error."""


class APITimeoutError(APIConnectionError):
    """The request timed out (connect, read between stream chunks, or write)."""


_BY_STATUS: dict[int, type[LorafoldError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: AuthenticationError,
    404: NotFoundError,
    409: BadRequestError,
    413: BadRequestError,
    422: BadRequestError,
    429: RateLimitError,
    503: ServerUnavailableError,
}


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date); None if absent/garbled."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_fields(response: httpx.Response) -> tuple[str, str | None, int | str | None]:
    """(message, type, code) from an error body; tolerant of non-JSON bodies (proxies, crashes)."""
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"], error.get("type"), error.get("code")
    if isinstance(body, dict) and isinstance(body.get("detail"), str):  # FastAPI's default shape
        return body["detail"], None, None
    text = response.text.strip()[:500]
    return text or (response.reason_phrase or f"HTTP {response.status_code}"), None, None


def error_from_response(response: httpx.Response) -> LorafoldError:
    """The typed error for a 4xx/5xx response (its body must already be read)."""
    message, type_, code = _error_fields(response)
    cls = _BY_STATUS.get(response.status_code, LorafoldError)
    kw: dict[str, object] = {"status_code": response.status_code, "type": type_, "code": code}
    if cls in (RateLimitError, ServerUnavailableError):
        kw["retry_after"] = parse_retry_after(response.headers.get("retry-after"))
    return cls(message, **kw)  # type: ignore[arg-type]


def error_from_stream_event(payload: dict) -> LorafoldError:
    """The error for an ``{"error": {...}}`` event sent inside an SSE stream (status already 200)."""
    error = payload.get("error")
    if not isinstance(error, dict):
        return LorafoldError(f"error event in stream: {payload!r}")
    return LorafoldError(str(error.get("message", "error in stream")), type=error.get("type"), code=error.get("code"))


def error_from_transport(exc: httpx.TransportError) -> APIConnectionError:
    """APITimeoutError for httpx timeouts, APIConnectionError for every other transport failure."""
    if isinstance(exc, httpx.TimeoutException):
        return APITimeoutError(f"request timed out ({type(exc).__name__}); raise `timeout` if generations are long")
    return APIConnectionError(f"could not reach the lorafold server: {exc or type(exc).__name__}")
