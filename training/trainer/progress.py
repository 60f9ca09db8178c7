"""Progress to stderr: a tqdm bar when tqdm is installed, else a log line every ~5 % of steps."""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger(__name__)


class Progress:
    def __init__(self, total: int, start: int, enabled: bool, silent: bool = False) -> None:
        """``enabled``: a tqdm bar if available (else log lines); ``silent``: neither (non-zero ranks)."""
        self.total, self.enabled, self.silent = total, enabled and not silent, silent
        self.every = max(1, total // 20)
        self.bar = None
        if self.enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, initial=start, file=sys.stderr, desc="train", dynamic_ncols=True)

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:.0f}")
        elif not self.silent and (step % self.every == 0 or step == self.total):
            logger.info("step %d/%d loss %.4f %.0f tokens/s", step, self.total, loss, tokens_per_s)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class EvalProgress:
    """Progress of one evaluation: its own tqdm bar (``eval@N``), else a log line every ~25 %.

    The opening log line (what is evaluated, on how many rows) is always written, so even a
    run without a terminal shows what the process is doing before the first step.
    """

    def __init__(self, step: int, rows: int, total: int, what: str, enabled: bool, silent: bool = False) -> None:
        self.step, self.total, self.done, self.silent = step, total, 0, silent
        self.next_log = max(1, total // 4)
        self.bar = None
        if silent:
            return
        logger.info("evaluating at step %d: %s on %d validation rows", step, what, rows)
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, file=sys.stderr, desc=f"eval@{step}", dynamic_ncols=True, leave=False)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif not self.silent and self.done >= self.next_log:
            logger.info("eval at step %d: %d/%d", self.step, self.done, self.total)
            self.next_log += max(1, self.total // 4)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
