"""Fit a conversation into the model's context window: which turns the model gets to see.

A model reads at most `context` tokens (its `sequence_len`), prompt and reply together. A chat
with a small model outgrows that after a few exchanges; refusing it then (as the engine would)
ends the conversation, so instead the oldest turns are left out of the prompt. The rules:

* whole turns go, oldest first -- a turn is a user message and the reply after it, so the
  prompt still starts with a user message and alternates as the chat template requires;
* the last user message (the one being answered) is never dropped, nor the system prompt;
* room is kept for the reply: at least `min(max_tokens, context // 2)` tokens, so a long
  history never leaves a reply one token long, and a short max_tokens keeps more history;
* only when the last message alone (with the system prompt) reaches the context is it an
  error, naming the limit.

The reply's max_tokens is then capped by what the context leaves after the prompt.
Lengths come from the tokenizer's own rendering (the same call the engine worker makes), so
the prompt measured here is exactly the prompt the model gets. No Django imports.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from chat.limits import FieldError

if TYPE_CHECKING:
    from engine.tokenizer import Tokenizer


@dataclass(frozen=True)
class Window:
    """The part of a conversation the model sees: messages[start:] (start 0: all of it)."""

    start: int
    prompt_tokens: int
    max_tokens: int  # the reply's max_tokens, capped by what the context leaves


def reply_room(context: int, max_tokens: int) -> int:
    """The tokens kept free for the reply when older turns are dropped."""
    return max(1, min(max_tokens, context // 2))


def fit(
    starts: Sequence[int],
    prompt_length: Callable[[int], int],
    context: int,
    max_tokens: int,
    what: str = "your message",
) -> Window:
    """The earliest start in `starts` (increasing message indexes where a turn begins; the
    last one is the answered message's) whose prompt leaves the reply its room.

    `prompt_length(start)` is the prompt's token count when the model sees messages[start:];
    it shrinks as start grows, so a binary search needs only a few renders of a long chat.
    """
    budget = context - reply_room(context, max_tokens)
    lo, hi = 0, len(starts) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if prompt_length(starts[mid]) <= budget:
            hi = mid
        else:
            lo = mid + 1
    length = prompt_length(starts[lo])
    if length >= context:
        raise FieldError(
            "content",
            f"{what} is {length} tokens long and this model reads at most {context} tokens "
            f"(prompt and reply together): shorten it",
        )
    return Window(
        start=starts[lo], prompt_tokens=length, max_tokens=min(max_tokens, context - length)
    )


def turn_starts(messages: Sequence[dict[str, Any]]) -> list[int]:
    """Indexes of the user messages: where a window may begin."""
    return [i for i, message in enumerate(messages) if message["role"] == "user"]


def chat_prompt(messages: Sequence[dict[str, Any]], system: str) -> list[dict[str, Any]]:
    """The messages the engine renders: the system prompt (SPEC §3: folded into the first user
    message by the tokenizer) first when there is one."""
    head = [{"role": "system", "content": system}] if system else []
    return [*head, *messages]


def fit_chat(
    tokenizer: Tokenizer,
    messages: Sequence[dict[str, Any]],
    system: str,
    context: int,
    max_tokens: int,
) -> Window:
    """Fit chat messages (user/assistant alternating, ending with the user's) and the system
    prompt, rendered with the chat template."""

    def length(start: int) -> int:
        prompt = chat_prompt(messages[start:], system)
        return len(tokenizer.render_for_completion({"messages": prompt}))

    what = "your message with the system prompt" if system else "your message"
    return fit(turn_starts(messages), length, context, max_tokens, what)


def completion_prompt(messages: Sequence[dict[str, Any]]) -> str:
    """Completion mode's prompt: the texts as one document, exactly as written (the user
    controls every space and newline between a continuation and what follows it)."""
    return "".join(message["content"] for message in messages)


def fit_completion(
    tokenizer: Tokenizer, messages: Sequence[dict[str, Any]], context: int, max_tokens: int
) -> Window:
    """Fit completion mode's document (raw text after BOS, no chat template)."""
    bos = tokenizer.get_bos_token_id()

    def length(start: int) -> int:
        return len(tokenizer.encode(completion_prompt(messages[start:]), prepend=bos))

    return fit(turn_starts(messages), length, context, max_tokens, "the text to continue")
