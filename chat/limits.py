"""The chat serving limits of SPEC §12, as pure validation functions.

Everything a client sends (a websocket frame, an OpenAI-style request body) passes through
here before it touches the database or the engine. A violation raises `FieldError`, which
names the offending field and says why, so the caller can answer with a field-level error
instead of crashing. No Django imports: the numbers come in as a `Limits` value (the
defaults are SPEC §12's; settings may override them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ROLES = ("user", "assistant")
MODES = ("chat", "completion")  # chat template, or raw text continuation


class FieldError(ValueError):
    """Input that breaks a limit: `field` names it (None when no single field is at fault)."""

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Limits:
    max_messages: int = 500
    max_message_chars: int = 8000
    max_total_chars: int = 32000
    min_temperature: float = 0.0
    max_temperature: float = 2.0
    default_temperature: float = 0.8
    max_top_k: int = 200  # 0 = no top-k
    default_top_k: int = 50
    max_max_tokens: int = 4096
    default_max_tokens: int = 512
    max_system_chars: int = 4000  # a conversation's system prompt


@dataclass(frozen=True)
class Sampling:
    """How one reply is sampled; top_k 0 means "no top-k"."""

    temperature: float
    top_k: int
    max_tokens: int

    def as_dict(self) -> dict[str, float | int]:
        return {"temperature": self.temperature, "top_k": self.top_k, "max_tokens": self.max_tokens}


def sampling(data: Mapping[str, Any], limits: Limits) -> Sampling:
    """temperature, top_k and max_tokens from `data`, each defaulted when absent or null."""
    temperature = _number(
        data, "temperature", limits.min_temperature, limits.max_temperature,
        limits.default_temperature,
    )  # fmt: skip
    top_k = _integer(data, "top_k", 0, limits.max_top_k, limits.default_top_k)
    max_tokens = _integer(data, "max_tokens", 1, limits.max_max_tokens, limits.default_max_tokens)
    return Sampling(temperature=temperature, top_k=top_k, max_tokens=max_tokens)


def content(data: Mapping[str, Any], limits: Limits, field: str = "content") -> str:
    """A user message's text: a non-blank string of at most max_message_chars characters."""
    value = data.get(field)
    if not isinstance(value, str):
        raise FieldError(field, f"{field} must be a string of text")
    if not value.strip():
        raise FieldError(field, f"{field} must not be empty")
    if "\x00" in value:  # never meaningful, and PostgreSQL cannot store it
        raise FieldError(field, f"{field} must not contain NUL characters")
    if len(value) > limits.max_message_chars:
        raise FieldError(
            field,
            f"{field} has {len(value)} characters; a message may have at most "
            f"{limits.max_message_chars}",
        )
    return value


def system_prompt(data: Mapping[str, Any], limits: Limits) -> str | None:
    """The conversation's system prompt, when the frame sets it ("" clears it); None when
    absent or null (the stored one stays)."""
    value = data.get("system")
    if value is None:
        return None
    if not isinstance(value, str) or "\x00" in value:
        raise FieldError("system", "system must be a string of text without NUL characters")
    if len(value) > limits.max_system_chars:
        raise FieldError(
            "system",
            f"system has {len(value)} characters; a system prompt may have at most "
            f"{limits.max_system_chars}",
        )
    return value.strip()


def mode(data: Mapping[str, Any]) -> str | None:
    """The conversation mode the frame asks for, None when absent or null."""
    value = data.get("mode")
    if value is None:
        return None
    if value not in MODES:
        raise FieldError("mode", f"mode must be one of {', '.join(MODES)}")
    return value


def object_id(data: Mapping[str, Any], field: str, *, required: bool) -> int | None:
    """A positive integer id, or None when it is absent/null and not required."""
    value = data.get(field)
    if value is None:
        if required:
            raise FieldError(field, f"{field} is required")
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FieldError(field, f"{field} must be a positive integer id")
    return value


def conversation_size(lengths: Sequence[int], limits: Limits) -> None:
    """Check a conversation of messages with these character counts (the new one included)."""
    if len(lengths) > limits.max_messages:
        raise FieldError(
            "conversation",
            f"a conversation may hold at most {limits.max_messages} messages; start a new one",
        )
    total = sum(lengths)
    if total > limits.max_total_chars:
        raise FieldError(
            "content",
            f"the conversation would hold {total} characters; at most "
            f"{limits.max_total_chars} are allowed, so start a new one",
        )


def messages(value: Any, limits: Limits) -> list[dict[str, str]]:
    """A stateless request's whole message list (e.g. an OpenAI-style API): roles user and
    assistant alternating from a user message and ending with one, each message and the total
    within the limits. Returns plain {"role", "content"} dicts."""
    if not isinstance(value, list) or not value:
        raise FieldError("messages", "messages must be a non-empty list")
    cleaned = []
    for index, message in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(message, Mapping):
            raise FieldError(where, f"{where} must be an object with role and content")
        role = message.get("role")
        if role not in ROLES:
            raise FieldError(f"{where}.role", f"{where}.role must be one of {', '.join(ROLES)}")
        expected = ROLES[index % 2]
        if role != expected:
            raise FieldError(
                f"{where}.role",
                f"{where}.role is {role!r} where {expected!r} was expected: roles must alternate "
                f"user/assistant starting with user",
            )
        text = message.get("content")
        if not isinstance(text, str) or "\x00" in text:
            raise FieldError(f"{where}.content", f"{where}.content must be a string without NUL")
        if len(text) > limits.max_message_chars:
            raise FieldError(
                f"{where}.content",
                f"{where}.content has {len(text)} characters; at most "
                f"{limits.max_message_chars} are allowed",
            )
        cleaned.append({"role": role, "content": text})
    if cleaned[-1]["role"] != "user":
        raise FieldError("messages", "the last message must be the user's")
    conversation_size([len(m["content"]) for m in cleaned], limits)
    return cleaned


def _number(data: Mapping[str, Any], field: str, low: float, high: float, default: float) -> float:
    value = data.get(field)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise FieldError(field, f"{field} must be a number between {low} and {high}")
    if not low <= value <= high:
        raise FieldError(field, f"{field} must be between {low} and {high}, got {value}")
    return float(value)


def _integer(data: Mapping[str, Any], field: str, low: int, high: int, default: int) -> int:
    value = data.get(field)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise FieldError(field, f"{field} must be a whole number between {low} and {high}")
    if not low <= value <= high:
        raise FieldError(field, f"{field} must be between {low} and {high}, got {value}")
    return value
