"""Stop strings over streamed text.

Text that could still turn into a stop string is held back, so a client never
sees the beginning of a stop sequence that is then cut.
"""

from __future__ import annotations


class StopStringMatcher:
    def __init__(self, stop: tuple[str, ...]) -> None:
        self._stop = tuple(s for s in stop if s)
        self._pending = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Add generated text; return what can be released now."""
        if not self._stop:
            return delta
        text = self._pending + delta
        cut = min((i for i in (text.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._pending = ""
            return text[:cut]
        hold = max((k for s in self._stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self._pending = text[len(text) - hold:] if hold else ""
        return text[:len(text) - hold]

    def flush(self) -> str:
        """Release held text at the end of generation (it never became a stop string)."""
        text, self._pending = self._pending, ""
        return text
