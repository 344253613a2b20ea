"""Turn a reply's token ids into streamed text pieces and the finished message's parts.

The model writes tool calls with special tokens (`<|python_start|> 12*34 <|python_end|>`, then
the calculator's `<|output_start|> 408 <|output_end|>`). Those tokens are not text: they switch
which part of the message the following text belongs to. The builder keeps one
`StreamDecoder` for the text (so a character split across tokens is never sent half-done),
tags every piece of text with its part, and rebuilds the message as SPEC §3 parts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.streaming import StreamDecoder

if TYPE_CHECKING:
    from engine.tokenizer import Tokenizer

_MARKERS = {
    "<|python_start|>": "python",
    "<|python_end|>": "text",
    "<|output_start|>": "python_output",
    "<|output_end|>": "text",
}


class ReplyBuilder:
    """Feed generated ids with `feed`, end with `finish`; read `content` and `parts` after."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._decoder = StreamDecoder(tokenizer)
        # A tokenizer without the tool tokens simply never switches parts.
        self._switch = {_special(tokenizer, name): part for name, part in _MARKERS.items()}
        # Stop tokens end the reply; they are not text.
        self._silent = {tokenizer.get_bos_token_id(), _special(tokenizer, "<|assistant_end|>")}
        self._part = "text"
        self._parts: list[dict[str, str]] = []
        self._text: list[str] = []

    def feed(self, token: int) -> list[tuple[str, str]]:
        """The (part, text) pieces `token` completes, possibly none."""
        if token in self._silent:
            return []
        part = self._switch.get(token)
        if part is None:
            return self._add(self._decoder.feed(token))
        pieces = self._close_part()
        self._part = part
        return pieces

    def finish(self) -> list[tuple[str, str]]:
        """Whatever text was held back; the builder is complete afterwards."""
        return self._close_part()

    @property
    def parts(self) -> list[dict[str, str]]:
        """The message's parts when it holds a tool call, else [] (plain text: see content)."""
        if all(part["type"] == "text" for part in self._parts):
            return []
        return [dict(part) for part in self._parts]

    @property
    def content(self) -> str:
        return "".join(part["text"] for part in self._parts if part["type"] == "text")

    def _add(self, text: str) -> list[tuple[str, str]]:
        # A model can emit the NUL byte; no reader wants it and PostgreSQL cannot store it.
        text = text.replace("\x00", "")
        if not text:
            return []
        self._text.append(text)
        return [(self._part, text)]

    def _close_part(self) -> list[tuple[str, str]]:
        pieces = self._add(self._decoder.flush())
        text = "".join(self._text)
        # An empty text part (between two tool calls, say) says nothing; an empty python part
        # still records that a call was made.
        if text or self._part != "text":
            self._parts.append({"type": self._part, "text": text})
        self._text = []
        return pieces


def _special(tokenizer: Tokenizer, name: str) -> int | None:
    try:
        return tokenizer.encode_special(name)
    except ValueError:
        return None
