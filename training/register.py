"""Register a trained PEFT folder with a running lorafold server, through the Python client
(`lorafold.clients`): one upload implementation, with its retries and error mapping."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lorafold.clients.client import LorafoldClient
from lorafold.clients.errors import LorafoldError

logger = logging.getLogger(__name__)


class RegistrationError(RuntimeError):
    """The server refused the adapter (or could not be reached); the message says why."""


def register_adapter(url: str, folder: str | Path, name: str, admin_key: str | None = None,
                     timeout: float = 120.0) -> dict[str, Any]:
    """Upload the folder's config and weights as adapter ``name``; returns the adapter info."""
    try:
        with LorafoldClient(url, admin_key=admin_key, timeout=timeout) as client:
            info = client.register_adapter(name, upload_dir=folder)
    except (LorafoldError, FileNotFoundError) as exc:
        raise RegistrationError(f"registering {name!r} at {url} failed: {exc}") from exc
    logger.info("registered adapter %r at %s", name, url)
    return info.model_dump()
