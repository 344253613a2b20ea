"""Turn a stream of token ids into a stream of text, never emitting half a character.

A byte-level BPE token can end in the middle of a multi-byte UTF-8 character (an emoji, a
Korean syllable), and decoding such a prefix shows U+FFFD where the character will be. So the
decoder keeps a small window of ids that starts at a known character boundary, decodes only
that window on each new id, and emits everything but a trailing U+FFFD, which it holds back
until the following ids complete the character. Once the window decodes without a trailing
U+FFFD it ends on a boundary again and is dropped, so each call costs O(window), not O(text).

A trailing U+FFFD that never completes (a genuine replacement character, or invalid bytes) is
released as soon as any later id shows it was final, or by `flush` at the end.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

REPLACEMENT = "\ufffd"
# A window only grows while every id ends inside a character. A real text never chains this
# many such ids; past it the window is released as is, so one call never costs more than this.
MAX_WINDOW = 32


class _Decodes(Protocol):
    def decode(self, ids: list[int]) -> str: ...


class StreamDecoder:
    """Feed ids one at a time with `feed`; call `flush` at the end for whatever is held back."""

    def __init__(self, tokenizer: _Decodes) -> None:
        self._tokenizer = tokenizer
        self._window: list[int] = []
        self._emitted = 0  # characters of decode(window) already returned

    def feed(self, token_id: int) -> str:
        """The new text that `token_id` completes (possibly empty)."""
        self._window.append(token_id)
        text = self._tokenizer.decode(self._window)
        if not text.endswith(REPLACEMENT):
            return self._release(text)
        if len(self._window) >= MAX_WINDOW:
            return self._release(text)
        # The character that U+FFFD stands for may still complete; emit what precedes it.
        delta = text[self._emitted : len(text) - 1]
        self._emitted += len(delta)
        return delta

    def feed_many(self, token_ids: Iterable[int]) -> str:
        return "".join(self.feed(token_id) for token_id in token_ids)

    def flush(self) -> str:
        """Everything still held back, and start afresh."""
        if not self._window:
            return ""
        return self._release(self._tokenizer.decode(self._window))

    def _release(self, text: str) -> str:
        delta = text[self._emitted :]
        self._window = []
        self._emitted = 0
        return delta
