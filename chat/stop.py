"""Stop strings matched on the decoded text of a reply, across token boundaries.

The OpenAI API's `stop` ends a reply at the first occurrence of any of up to four strings. A
stop string can span tokens ("\\n\\n" as two "\\n" tokens, "END" as "EN" + "D"), so the matcher
works on text, not ids: each `feed` gets the next decoded text and returns what may be shown
now. Text that could still turn out to be the start of a stop string is held back until the
following text resolves it, so a stream never shows any part of a stop string; the text before
a match is released, the stop string and everything after it are dropped.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Feed decoded text with `feed`; at the end call `flush` for the held-back text."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [stop for stop in stops if stop]
        self.matched: str | None = None  # the stop string found, once found
        self._held = ""
        self._shown: list[str] = []
        self.shown = 0  # characters shown so far: len(self.text)

    def feed(self, text: str) -> str:
        """The part of `text` (with what was held back) that can be shown now."""
        if self.matched is not None:
            return ""
        buffer = self._held + text
        found = [(buffer.find(stop), stop) for stop in self.stops]
        found = [(index, stop) for index, stop in found if index >= 0]
        if found:
            index, self.matched = min(found)
            self._held = ""
            return self._show(buffer[:index])
        keep = max((_prefix_overlap(buffer, stop) for stop in self.stops), default=0)
        self._held = buffer[len(buffer) - keep :]
        return self._show(buffer[: len(buffer) - keep])

    def flush(self) -> str:
        """The held-back text: the reply ended without a stop string completing."""
        held, self._held = self._held, ""
        return self._show(held) if self.matched is None else ""

    @property
    def text(self) -> str:
        """Everything shown so far: the reply's content."""
        return "".join(self._shown)

    def _show(self, text: str) -> str:
        if text:
            self._shown.append(text)
            self.shown += len(text)
        return text


def _prefix_overlap(text: str, stop: str) -> int:
    """The length of the longest end of `text` that is a proper start of `stop`."""
    for length in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:length]):
            return length
    return 0
