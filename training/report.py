"""Run report: ``report.json`` (config, timings, throughput, losses, evals) and ``loss_curve.png``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def build_report(cfg: Any, hist: Any, n_train: int, n_val: int, steps: int, device: str) -> dict[str, Any]:
    evals = hist.evals
    return {
        "config": cfg.public_dict(),  # secrets redacted: the run folder is shared
        "device": device,
        "steps": steps,
        "examples": {"train": n_train, "val": n_val},
        "train_seconds": round(hist.seconds, 3),
        "train_tokens": hist.tokens,
        "tokens_per_s": round(hist.tokens / hist.seconds, 2) if hist.seconds else None,
        "step_seconds": round(hist.seconds / max(len(hist.losses), 1), 4),
        "losses": [round(x, 6) for x in hist.losses],
        "eval_before": evals[0] if evals else None,
        "eval_after": evals[-1] if evals else None,
        "evals": evals,
    }


def plot_curves(path: Path, curves: dict[str, list[float]], title: str, evals: dict[str, list] | None = None) -> Path | None:
    """One PNG with one training-loss line per name (and validation points if given)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no %s", path.name)
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, losses in curves.items():
        line, = ax.plot(range(1, len(losses) + 1), losses, label=f"{name} train", linewidth=1.2)
        points = [(e["step"], e["val_loss"]) for e in (evals or {}).get(name, []) if e.get("val_loss") is not None]
        if points:
            ax.plot(*zip(*points), "o--", color=line.get_color(), label=f"{name} val", markersize=4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean token CE)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(out: Path, report: dict[str, Any], hist: Any) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_curves(out / "loss_curve.png", {report["config"]["optimizer"]: hist.losses}, "training loss",
                {report["config"]["optimizer"]: hist.evals})
