"""Register a trained PEFT folder with a running lorafold server (multipart upload)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import httpx

from lorafold.training.peft_export import CONFIG_NAME, WEIGHTS_NAME

logger = logging.getLogger(__name__)


class RegistrationError(RuntimeError):
    """The server refused the adapter; the message carries its status and reply."""


def register_adapter(url: str, folder: str | Path, name: str, admin_key: str | None = None,
                     timeout: float = 120.0) -> dict[str, Any]:
    """POST ``{url}/v1/adapters`` with ``name`` + the folder's config and weights; returns the adapter info."""
    folder = Path(folder)
    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    with (folder / CONFIG_NAME).open("rb") as cfg, (folder / WEIGHTS_NAME).open("rb") as weights:
        files = {"config": (CONFIG_NAME, cfg, "application/json"),
                 "weights": (WEIGHTS_NAME, weights, "application/octet-stream")}
        resp = httpx.post(f"{url.rstrip('/')}/v1/adapters", data={"name": name}, files=files, headers=headers,
                          timeout=timeout)
    if resp.status_code != 201:
        raise RegistrationError(f"registering {name!r} at {url} failed: HTTP {resp.status_code}: {resp.text[:500]}")
    logger.info("registered adapter %r at %s", name, url)
    return resp.json()
