"""Checkpoints: adapter tensors + optimizer + scheduler + step (+ residual-init factors).

Layout: ``OUT/checkpoints/step-000123/state.pt``. Data order is a pure function of
(seed, micro-batch index), so the step number is all the loop needs to continue exactly.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

STATE_FILE = "state.pt"


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:06d}"


def save_checkpoint(out: Path, step: int, payload: dict[str, Any]) -> Path:
    folder = checkpoint_dir(out, step)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (STATE_FILE + ".tmp")
    torch.save({"step": step, **payload}, tmp)
    tmp.replace(folder / STATE_FILE)  # atomic: a crash never leaves a half-written checkpoint
    logger.info("checkpoint at step %d → %s", step, folder)
    return folder


def find_checkpoint(path: str | Path) -> Path:
    """``path`` itself (a step folder) or the latest ``checkpoints/step-*`` under a run folder."""
    path = Path(path)
    if (path / STATE_FILE).exists():
        return path / STATE_FILE
    steps = sorted((path / "checkpoints").glob(f"step-*/{STATE_FILE}"))
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {path}: pass a run folder with checkpoints/ or a step-* folder")
    return steps[-1]


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    file = find_checkpoint(path)
    logger.info("resuming from %s", file)
    # weights_only: our payload is tensors, numbers, strings, lists and dicts
    return torch.load(file, map_location="cpu", weights_only=True)
