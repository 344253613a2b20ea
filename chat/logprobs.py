"""Which generated tokens' log-probabilities a reply reports, and when they go out.

The engine gives every generated token of a row that asked its `TokenLogprob` (the
log-softmax of the model's raw logits: the model's own distribution, not the temperature /
top-k one the row sampled from). The OpenAI API lists logprobs per token *of the returned
text*, so what is listed must agree with the text the client gets, streamed or whole:

* A token is listed when its text starts inside the returned text. Its `offset` is where that
  is: the number of characters of the reply's text before it (a token that is only part of a
  character starts where that character will be).
* Special tokens are not text and are not listed: the end token, and a calculator call
  (`<|python_start|> ... <|python_end|>` and the forced `<|output_start|> ... <|output_end|>`),
  whose text is not part of the returned content either.
* Stop strings (chat/stop.py): a token's entry goes out together with the first character of
  its text, so a held-back token is held back with its text, and when a stop string matches,
  the tokens starting at or after the cut are dropped with the text. A token that straddles
  the cut (some characters before the stop string, the rest in it) has text in the answer and
  so is listed -- whole: its `token` and `bytes` are the token's own, and may run past the
  returned text. So the listed tokens' texts, joined, start with the returned text and run past
  it by less than one token; their `offset`s all point inside it.

Each entry is `{token, bytes, logprob, top_logprobs: [{token, bytes, logprob}], offset}`:
OpenAI's chat shape plus the offset, which the legacy completions shape needs (`text_offset`).
`token` is the token's bytes read as UTF-8, with bytes that are only part of a character
written as `\\xNN` escapes; `bytes` holds them exactly.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.engine import TokenLogprob
    from engine.tokenizer import Tokenizer

# OpenAI's floor for a log-probability too small to show (and JSON has no -Infinity).
FLOOR = -9999.0
_TOOL_OPEN = ("<|python_start|>", "<|output_start|>")
_TOOL_CLOSE = ("<|python_end|>", "<|output_end|>")


class TokenTexts:
    """Token ids as OpenAI shows them (`token`, `bytes`), cached: one per loaded tokenizer."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        names = tokenizer.special_tokens
        self.specials = {tokenizer.encode_special(name) for name in names}
        self.tool_open = {tokenizer.encode_special(n) for n in _TOOL_OPEN if n in names}
        self.tool_close = {tokenizer.encode_special(n) for n in _TOOL_CLOSE if n in names}
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def of(self, token: int) -> tuple[str, list[int]]:
        found = self._cache.get(token)
        if found is None:
            raw = self.tokenizer.id_to_bytes(token)
            found = self._cache[token] = (raw.decode("utf-8", "backslashreplace"), list(raw))
        return found

    def entry(self, token: int, logprob: float) -> dict[str, Any]:
        text, raw = self.of(token)
        return {"token": text, "bytes": raw, "logprob": max(logprob, FLOOR)}


class LogprobTracker:
    """One reply's token entries, from generation to release.

    `token` notes each generated token (before its text is fed on), `text` counts the reply's
    text characters as they are produced, and `release(shown)` hands out the entries of the
    tokens whose text starts before `shown`, the characters the client has been sent so far.
    """

    def __init__(self, texts: TokenTexts) -> None:
        self.texts = texts
        self.produced = 0  # characters of the reply's text produced so far
        self._in_tool = False
        self._held: deque[dict[str, Any]] = deque()

    def token(self, token: int, logprob: TokenLogprob) -> None:
        texts = self.texts
        if token in texts.specials:
            if token in texts.tool_open:
                self._in_tool = True
            elif token in texts.tool_close:
                self._in_tool = False
            return
        if self._in_tool:
            return
        entry = texts.entry(token, logprob.logprob)
        entry["top_logprobs"] = [texts.entry(other, value) for other, value in logprob.top]
        entry["offset"] = self.produced
        self._held.append(entry)

    def text(self, characters: int) -> None:
        self.produced += characters

    def release(self, shown: int) -> list[dict[str, Any]]:
        out = []
        while self._held and self._held[0]["offset"] < shown:
            out.append(self._held.popleft())
        return out
