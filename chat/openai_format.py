"""The OpenAI chat-completions and completions wire format: a request body in, objects out.

Existing OpenAI clients (the official SDKs, curl scripts, chat front ends) should work against
`/v1/` unchanged, so this module accepts what they send and answers in the shapes they parse.
It is pure (no Django, no engine): chat/openai_api.py authenticates, finds the checkpoint and
drives the engine; this turns a JSON body into validated `CompletionParams` and a finished or
streaming reply into `chat.completion` / `chat.completion.chunk` objects (and the legacy
`/v1/completions` body into `TextCompletionParams`, answered as `text_completion` objects).

Supported: `n` (1-8 choices sampled from one prefill), `stop` (a string or up to 4, matched on
the decoded text), `seed`, `temperature`, `max_tokens` / `max_completion_tokens`, `stream` and
`stream_options.include_usage`, `logprobs` (chat: `logprobs: true` and `top_logprobs` 0-20;
completions: `logprobs` 0-5, OpenAI's legacy shape), and `top_k` as an extension. What nanochat
cannot do is refused rather than silently ignored, with the field named in the error's "param"
(`UNSUPPORTED`): nucleus sampling (`top_p` other than 1), penalties, `logit_bias`, tools and
function calls, structured output (`response_format` other than text), audio. Neutral values of those
(`top_p: 1`, `tools: []`, `response_format: {"type": "text"}`...) are accepted, since some
clients always send them. Anything else (`user`, `metadata`, `store`...) is harmless metadata
and ignored, as OpenAI does with fields it does not use. docs/api.md has the table.

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
MAX_CHOICES = 8  # n
MAX_STOPS = 4  # stop strings
MAX_STOP_CHARS = 200  # per stop string
MAX_PROMPTS = 8  # /v1/completions: prompts in one request
MAX_TOP_LOGPROBS = 20  # chat: alternatives listed per token (OpenAI's bound)
MAX_TEXT_LOGPROBS = 5  # completions: the same, in the legacy API (OpenAI's bound)
# Parameters nanochat cannot honour: (the values that ask for nothing -- null always does --,
# why not). Chat completions and completions share them.
_TOOLS = "tools and function calling are not supported: nanochat models only write text"
UNSUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "top_p": ((1,), "nucleus sampling is not supported (top_p must be 1); use top_k instead"),
    "frequency_penalty": ((0,), "frequency_penalty is not supported (it must be 0)"),
    "presence_penalty": ((0,), "presence_penalty is not supported (it must be 0)"),
    "logit_bias": (({},), "logit_bias is not supported"),
    "tools": (([],), _TOOLS),
    "tool_choice": (("none",), _TOOLS),
    "parallel_tool_calls": ((False, True), _TOOLS),  # meaningless without tools
    "functions": (([],), _TOOLS),
    "function_call": (("none",), _TOOLS),
    "response_format": (
        ({"type": "text"},),
        'structured output is not supported: response_format must be {"type": "text"}',
    ),
    "modalities": ((["text"],), 'only text output is supported (modalities must be ["text"])'),
    "audio": ((), "audio output is not supported"),
    "prediction": ((), "predicted outputs are not supported"),
    "reasoning_effort": ((), "reasoning_effort is not supported: nanochat models do not reason"),
    "web_search_options": ((), "web search is not supported"),
}
# /v1/completions: the same (but tools), plus its own.
UNSUPPORTED_TEXT: dict[str, tuple[tuple[Any, ...], str]] = {
    **{
        name: UNSUPPORTED[name]
        for name in ("top_p", "frequency_penalty", "presence_penalty", "logit_bias")
    },  # fmt: skip
    "suffix": (("",), "suffix (insertion) is not supported"),
    "best_of": ((1,), "best_of is not supported (it must be 1); use n"),
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
    n: int = 1
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: no logprobs; k: each token's, with k alternatives


@dataclass(frozen=True)
class TextCompletionParams:
    """A validated legacy completions request: raw text to continue, no chat template."""

    model: str
    prompts: list[str]  # each its own group of n choices
    sampling: Sampling
    stream: bool
    include_usage: bool
    seed: int | None
    n: int = 1
    stop: tuple[str, ...] = ()
    echo: bool = False
    logprobs: int | None = None


def parse_text_completion(body: Any, lim: Limits) -> TextCompletionParams:
    """Validate a /v1/completions body; ApiError (400, naming the param) if bad."""
    if not isinstance(body, Mapping):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        common = _common(body, lim, UNSUPPORTED_TEXT)
        echo, logprobs = _optional_bool(body, "echo"), _text_logprobs(body.get("logprobs"))
        if echo and logprobs is not None:
            raise FieldError(
                "echo", "echo cannot be combined with logprobs: the prompt's log-probabilities "
                "are not computed (ask without echo and prepend the prompt yourself)",
            )  # fmt: skip
        return TextCompletionParams(
            **common, prompts=_prompts(body.get("prompt"), lim), echo=echo, logprobs=logprobs
        )
    except FieldError as exc:
        raise ApiError(400, exc.message, param=exc.field) from None


def _text_logprobs(value: Any) -> int | None:
    """The legacy `logprobs`: null (none) or how many alternatives per token, 0 to 5."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TEXT_LOGPROBS:
        raise FieldError(
            "logprobs", f"logprobs must be null or a whole number from 0 to {MAX_TEXT_LOGPROBS}"
        )
    return value


def _chat_logprobs(body: Mapping[str, Any]) -> int | None:
    """`logprobs: true` with `top_logprobs` alternatives (0 to 20) per token, else None."""
    wanted = _optional_bool(body, "logprobs")
    top = body.get("top_logprobs")
    if top is None:
        return 0 if wanted else None
    if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS:
        raise FieldError(
            "top_logprobs", f"top_logprobs must be a whole number from 0 to {MAX_TOP_LOGPROBS}"
        )
    if top and not wanted:
        raise FieldError("top_logprobs", "top_logprobs needs logprobs: true")
    return top if wanted else None


def _prompts(value: Any, lim: Limits) -> list[str]:
    prompts = [value] if isinstance(value, str) else value
    if not isinstance(prompts, list) or not prompts:
        raise FieldError("prompt", "prompt is required: a string or a list of strings")
    if len(prompts) > MAX_PROMPTS:
        raise FieldError("prompt", f"at most {MAX_PROMPTS} prompts in one request")
    for prompt in prompts:  # "" is fine: the model continues from BOS alone
        if not isinstance(prompt, str):
            raise FieldError(
                "prompt", "prompt must be a string or a list of strings (token ids are not "
                "supported)",
            )  # fmt: skip
        if len(prompt) > lim.max_total_chars:
            raise FieldError("prompt", f"a prompt is at most {lim.max_total_chars} characters")
    return prompts


def _common(
    body: Mapping[str, Any], lim: Limits, unsupported: dict[str, tuple[tuple[Any, ...], str]]
) -> dict[str, Any]:
    """What both endpoints share: model, refusals, sampling, n, stop, stream, seed."""
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise FieldError("model", "model is required: one of the ids GET /v1/models lists")
    for name, (neutral, reason) in unsupported.items():
        value = body.get(name)
        if value is not None and not _is_one_of(value, neutral):
            raise FieldError(name, reason)
    stream = _optional_bool(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, Mapping):
        raise FieldError("stream_options", "stream_options must be an object")
    include_usage = _optional_bool(options or {}, "include_usage", "stream_options.include_usage")
    return {
        "model": model.strip(),
        "sampling": _sampling(body, lim),
        "stream": stream,
        "include_usage": include_usage,
        "seed": _seed(body.get("seed")),
        "n": _choices(body.get("n")),
        "stop": _stops(body.get("stop")),
    }


def _choices(value: Any) -> int:
    if value is None:
        return 1
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CHOICES:
        raise FieldError("n", f"n must be a whole number from 1 to {MAX_CHOICES}")
    return value


def _stops(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(stop, str) for stop in stops):
        raise FieldError("stop", "stop must be a string or a list of strings")
    if len(stops) > MAX_STOPS:
        raise FieldError("stop", f"stop holds at most {MAX_STOPS} strings")
    if any(len(stop) > MAX_STOP_CHARS for stop in stops):
        raise FieldError("stop", f"a stop string is at most {MAX_STOP_CHARS} characters")
    return tuple(stop for stop in stops if stop)  # "" stops nothing


def parse_completion(body: Any, lim: Limits) -> CompletionParams:
    """Validate a chat-completions request body; ApiError (400, naming the param) if bad."""
    if not isinstance(body, Mapping):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return _parse(body, lim)
    except FieldError as exc:
        raise ApiError(400, exc.message, param=exc.field) from None


def _parse(body: Mapping[str, Any], lim: Limits) -> CompletionParams:
    common = _common(body, lim, UNSUPPORTED)
    return CompletionParams(
        **common, messages=_messages(body.get("messages"), lim), logprobs=_chat_logprobs(body)
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


def finish_reason(reason: str | None) -> str | None:
    return None if reason is None else FINISH_REASONS.get(reason, "stop")


def chat_logprobs(entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """A choice's `logprobs` from the worker's token entries (chat/logprobs.py); None when
    they were not asked for."""
    if entries is None:
        return None
    content = [{key: value for key, value in entry.items() if key != "offset"}
               for entry in entries]  # fmt: skip
    return {"content": content, "refusal": None}


def text_logprobs(entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """The legacy completions' `logprobs`: parallel lists, each position's alternatives as
    {token: logprob} with the chosen token among them (so up to k + 1 of them, as OpenAI)."""
    if entries is None:
        return None
    tops = []
    for entry in entries:
        top = {other["token"]: other["logprob"] for other in entry["top_logprobs"]}
        top.setdefault(entry["token"], entry["logprob"])
        tops.append(top)
    return {
        "tokens": [entry["token"] for entry in entries],
        "token_logprobs": [entry["logprob"] for entry in entries],
        "top_logprobs": tops,
        "text_offset": [entry["offset"] for entry in entries],
    }


def completion(
    completion_id: str,
    created: int,
    model: str,
    contents: list[tuple[str, str]],
    counts: dict,
    logprobs: list[list[dict[str, Any]] | None] | None = None,
) -> dict[str, Any]:
    """A whole reply: the `chat.completion` object, a choice per (content, finish reason),
    with each choice's token entries when logprobs were asked."""
    logprobs = logprobs or [None] * len(contents)
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": index,
                "message": {"role": "assistant", "content": content},
                "finish_reason": finish_reason(reason),
                "logprobs": chat_logprobs(entries),
            }
            for index, ((content, reason), entries) in enumerate(
                zip(contents, logprobs, strict=True)
            )
        ],
        "usage": counts,
    }


def chunk(
    completion_id: str,
    created: int,
    model: str,
    delta: dict[str, str],
    finish_reason_: str | None = None,
    index: int = 0,
    logprobs: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One streamed piece: the `chat.completion.chunk` object with a single choice (and the
    entries of the tokens whose text it carries, when logprobs were asked)."""
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": index,
                "delta": delta,
                "finish_reason": finish_reason(finish_reason_),
                "logprobs": chat_logprobs(logprobs),
            }
        ],
    }


def text_completion(
    completion_id: str,
    created: int,
    model: str,
    texts: list[tuple[str, str | None]],
    counts,
    logprobs: list[list[dict[str, Any]] | None] | None = None,
) -> dict[str, Any]:
    """A legacy completion (`text_completion`): a choice per (text, finish reason); while
    streaming, one choice per chunk and `usage` only on the extra last one."""
    logprobs = logprobs or [None] * len(texts)
    body: dict[str, Any] = {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": index,
                "text": text,
                "finish_reason": finish_reason(reason),
                "logprobs": text_logprobs(entries),
            }
            for index, ((text, reason), entries) in enumerate(zip(texts, logprobs, strict=True))
        ],
    }
    if counts is not None:
        body["usage"] = counts
    return body


def text_chunk(
    completion_id: str,
    created: int,
    model: str,
    text: str,
    reason: str | None,
    index: int,
    logprobs: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    body = text_completion(completion_id, created, model, [(text, reason)], None, [logprobs])
    body["choices"][0]["index"] = index
    return body


def usage_chunk(
    completion_id: str,
    created: int,
    model: str,
    counts: dict,
    object: str = "chat.completion.chunk",
) -> dict[str, Any]:
    """The extra last chunk `stream_options.include_usage` asks for: no choices, the counts."""
    return {
        "id": completion_id,
        "object": object,
        "created": created,
        "model": model,
        "choices": [],
        "usage": counts,
    }
