"""Stop strings over streamed text, including stop strings that span tokens (torch-free).

`StopChecker.feed(text)` returns the text that is safe to emit. It holds back any tail that
could still grow into a stop string, and on a match returns the text before the stop string
and reports which stop string matched. The result is exactly "the full text cut before the
earliest occurrence of any stop string", however the text was split into pieces.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class StopResult:
    text: str  # new text safe to emit
    stop: str | None = None  # the stop string that ended the text, if one did


class StopChecker:
    def __init__(self, stop: Iterable[str]) -> None:
        self.stop = list(stop)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must be non-empty str")
        self._max_len = max((len(s) for s in self.stop), default=0)
        self._held = ""
        self.matched: str | None = None

    @property
    def finished(self) -> bool:
        return self.matched is not None

    @property
    def held(self) -> str:
        """Text withheld because it may be the start of a stop string."""
        return self._held

    def feed(self, text: str) -> StopResult:
        if self.matched is not None:
            return StopResult("", None)
        if not self.stop:
            return StopResult(text)
        buf = self._held + text
        match_at, match = self._earliest_match(buf)
        # A stop string that starts before the match but is not complete yet could still end
        # up being the earliest one: wait for more text before deciding.
        partial_at = self._earliest_partial(buf, limit=match_at if match is not None else len(buf))
        if partial_at is not None:
            self._held = buf[partial_at:]
            return StopResult(buf[:partial_at])
        self._held = ""
        if match is not None:
            self.matched = match
            return StopResult(buf[:match_at], match)
        return StopResult(buf)

    def flush(self) -> StopResult:
        """No more text will come: resolve what is held (a complete match still stops)."""
        if self.matched is not None:
            return StopResult("", None)
        buf, self._held = self._held, ""
        match_at, match = self._earliest_match(buf)
        if match is not None:
            self.matched = match
            return StopResult(buf[:match_at], match)
        return StopResult(buf)

    def _earliest_match(self, buf: str) -> tuple[int, str | None]:
        best_at, best = len(buf), None
        for s in self.stop:  # on a tie the first stop string in the list wins
            at = buf.find(s)
            if at != -1 and at < best_at:
                best_at, best = at, s
        return best_at, best

    def _earliest_partial(self, buf: str, limit: int) -> int | None:
        """Smallest i < limit such that buf[i:] is a proper prefix of some stop string."""
        for i in range(max(0, len(buf) - self._max_len + 1), min(limit, len(buf))):
            tail = buf[i:]
            if any(len(s) > len(tail) and s.startswith(tail) for s in self.stop):
                return i
        return None
