"""Bearer-key checks: API keys for inference, a separate admin key for the adapter registry."""

from __future__ import annotations

import hmac

from fastapi import Request

from lorafold.server.api.context import server_context
from lorafold.server.api.errors import APIError


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(token: str | None, keys: tuple[str, ...]) -> bool:
    # constant-time comparison: no timing side channel on key prefixes. On bytes: compare_digest
    # refuses str with non-ASCII characters, which any client can put in a header.
    if token is None:
        return False
    presented = token.encode("utf-8", "surrogateescape")
    return any(hmac.compare_digest(presented, k.encode("utf-8", "surrogateescape")) for k in keys)


def require_api_key(request: Request) -> None:
    settings = server_context(request).settings
    if not settings.api_keys:
        return
    token = _bearer(request)
    if not _matches(token, settings.api_keys + ((settings.admin_key,) if settings.admin_key else ())):
        raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'", "authentication_error",
                       headers={"WWW-Authenticate": "Bearer"})


def require_admin(request: Request) -> None:
    settings = server_context(request).settings
    if settings.admin_key is None:
        if settings.open_access:
            return  # localhost-only server without keys
        raise APIError(403, "the adapter registry is disabled: start the server with --admin-key", "permission_error")
    if not _matches(_bearer(request), (settings.admin_key,)):
        raise APIError(401, "the adapter registry needs the admin key: send 'Authorization: Bearer <admin key>'",
                       "authentication_error", headers={"WWW-Authenticate": "Bearer"})
