"""The OpenAI chat-completions wire format: a request body in, response objects out.

Existing OpenAI clients (the official SDKs, curl scripts, chat front ends) should work against
`/v1/` unchanged, so this module accepts what they send and answers in the shapes they parse.
It is pure (no Django, no engine): chat/openai_api.py authenticates, finds the checkpoint and
drives the engine; this turns a JSON body into validated `CompletionParams` and a finished or
streaming reply into `chat.completion` / `chat.completion.chunk` objects.

What nanochat cannot do is refused rather than silently ignored, with the field named in the
error's "param": more than one choice (`n`), stop sequences (`stop`), nucleus sampling
(`top_p` other than 1), penalties, logprobs and tools. Neutral values of those (`n: 1`,
`top_p: 1`, `stop: null`...) are accepted, since some clients always send them. Anything else
unknown (`user`, `metadata`, ...) is ignored, as OpenAI does with fields it does not use.

Messages: nanochat models know only user and assistant turns, alternating from a user turn. A
leading `system` (or `developer`) message is folded into the first user message (its text,
a blank line, then the user's text), which is what nanochat's own tokenizer does with one.
Content may be a string or a list of text parts (`[{"type": "text", "text": ...}]`), which
are joined with newlines. The limits are the chat websocket's (SPEC §12, chat/limits.py), with
`top_k` (0-200, 0 = off) accepted as an extension; `max_completion_tokens` is preferred over
the older `max_tokens` when both are sent.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from chat import limits
from chat.limits import FieldError, Limits, Sampling

SYSTEM_ROLES = ("system", "developer")
MAX_SEED = 2**63 - 1
# Parameters nanochat cannot honour, with the values that ask for nothing (null always does).
NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "n": (1,),
    "top_p": (1,),
    "stop": ("", []),
    "frequency_penalty": (0,),
    "presence_penalty": (0,),
    "logprobs": (False,),
    "top_logprobs": (0,),
    "logit_bias": ({},),
    "tools": ([],),
    "tool_choice": ("none",),
}
UNSUPPORTED_REASONS = {
    "n": "only one choice per request is supported (n must be 1)",
    "top_p": "nucleus sampling is not supported (top_p must be 1); use top_k instead",
    "stop": "stop sequences are not supported; the reply ends at the model's own end token",
}
# The engine's finish reasons, as OpenAI names them ("stopped" can only be a client gone).
FINISH_REASONS = {"stop": "stop", "length": "length", "stopped": "stop"}


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


@dataclass(frozen=True)
class CompletionParams:
    """A validated chat-completions request."""

    model: str
    messages: list[dict[str, str]]
    sampling: Sampling
    stream: bool
    include_usage: bool  # stream_options.include_usage: one more chunk, with the token counts
    seed: int | None  # None: a fresh random seed per reply


def parse_completion(body: Any, lim: Limits) -> CompletionParams:
    """Validate a chat-completions request body; ApiError (400, naming the param) if bad."""
    if not isinstance(body, Mapping):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return _parse(body, lim)
    except FieldError as exc:
        raise ApiError(400, exc.message, param=exc.field) from None


def _parse(body: Mapping[str, Any], lim: Limits) -> CompletionParams:
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise FieldError("model", "model is required: one of the ids GET /v1/models lists")
    for name, neutral in NEUTRAL_VALUES.items():
        value = body.get(name)
        if value is not None and not _is_one_of(value, neutral):
            raise FieldError(name, UNSUPPORTED_REASONS.get(name, f"{name} is not supported"))
    stream = _optional_bool(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, Mapping):
        raise FieldError("stream_options", "stream_options must be an object")
    include_usage = _optional_bool(options or {}, "include_usage", "stream_options.include_usage")
    return CompletionParams(
        model=model.strip(),
        messages=_messages(body.get("messages"), lim),
        sampling=_sampling(body, lim),
        stream=stream,
        include_usage=include_usage,
        seed=_seed(body.get("seed")),
    )


def _messages(value: Any, lim: Limits) -> list[dict[str, str]]:
    """The conversation as chat/limits.py wants it: text contents, a system message folded."""
    if not isinstance(value, list) or not value:
        raise FieldError("messages", "messages must be a non-empty list")
    plain = [_plain_message(message, index) for index, message in enumerate(value)]
    folded = 0
    if plain[0].get("role") in SYSTEM_ROLES:
        if len(plain) < 2 or plain[1].get("role") != "user":
            raise FieldError("messages[1].role", "a system message must be followed by a user one")
        system, user = plain[0]["content"], plain[1]["content"]
        plain = [{"role": "user", "content": f"{system}\n\n{user}"}, *plain[2:]]
        folded = 1
    try:
        return limits.messages(plain, lim)
    except FieldError as exc:
        # Name the message as the client numbered it, before the fold.
        field = _shift_index(exc.field, folded) if exc.field else exc.field
        message = _shift_index(exc.message, folded)
        raise FieldError(field, message) from None


def _plain_message(message: Any, index: int) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(message, Mapping):
        raise FieldError(where, f"{where} must be an object with role and content")
    content = message.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text":
                raise FieldError(
                    f"{where}.content", f"{where}.content: only text parts are supported"
                )
            if not isinstance(part.get("text"), str):
                raise FieldError(f"{where}.content", f"{where}.content: a text part needs text")
            texts.append(part["text"])
        content = "\n".join(texts)
    return {"role": message.get("role"), "content": content}


def _shift_index(text: str, by: int) -> str:
    if not by:
        return text
    return re.sub(r"messages\[(\d+)\]", lambda m: f"messages[{int(m[1]) + by}]", text)


def _sampling(body: Mapping[str, Any], lim: Limits) -> Sampling:
    name = (
        "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    )
    wanted = {"temperature": body.get("temperature"), "top_k": body.get("top_k"),
              "max_tokens": body.get(name)}  # fmt: skip
    try:
        return limits.sampling(wanted, lim)
    except FieldError as exc:
        if exc.field != "max_tokens":
            raise
        raise FieldError(name, exc.message.replace("max_tokens", name)) from None


def _seed(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise FieldError("seed", f"seed must be a whole number between 0 and {MAX_SEED}")
    return value


def _optional_bool(data: Mapping[str, Any], key: str, field: str | None = None) -> bool:
    value = data.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise FieldError(field or key, f"{field or key} must be true or false")
    return value


def _is_one_of(value: Any, allowed: tuple[Any, ...]) -> bool:
    if isinstance(value, bool):  # `True == 1` in Python: `n: true` is not `n: 1`
        return any(value is a for a in allowed)
    return value in allowed


# ---- responses ------------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion(
    completion_id: str, created: int, model: str, content: str, finish_reason: str, counts: dict
) -> dict[str, Any]:
    """A whole reply: the `chat.completion` object."""
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": FINISH_REASONS.get(finish_reason, "stop"),
                "logprobs": None,
            }
        ],
        "usage": counts,
    }


def chunk(
    completion_id: str,
    created: int,
    model: str,
    delta: dict[str, str],
    finish_reason: str | None = None,
) -> dict[str, Any]:
    """One streamed piece: the `chat.completion.chunk` object with a single choice."""
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "delta": delta,
                "finish_reason": None
                if finish_reason is None
                else FINISH_REASONS.get(finish_reason, "stop"),
                "logprobs": None,
            }
        ],
    }


def usage_chunk(completion_id: str, created: int, model: str, counts: dict) -> dict[str, Any]:
    """The extra last chunk `stream_options.include_usage` asks for: no choices, the counts."""
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [],
        "usage": counts,
    }
