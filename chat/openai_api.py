"""The OpenAI-compatible API: `GET /v1/models` and `POST /v1/chat/completions`.

Point an OpenAI client at `http://host:8000/v1` with a DRF API token as its key
(`OpenAI(base_url=..., api_key=token)`: it sends `Authorization: Bearer <token>`); a signed-in
browser session works too (with the CSRF token on POST, as for the rest of the site).

A completion runs on the same engine path as the chat websocket: the view validates (the
wire format and the limits are in chat/openai_format.py), finds the checkpoint, and drives a
`Reply` (chat/protocol.py) that an engine worker answers. Nothing is saved: the API is
stateless, the client sends the whole conversation each time.

The views are async so that a streaming reply holds no thread while it waits for tokens:
`stream: true` answers with server-sent events from an async generator that drives the
`Reply`. When the client goes away, Django cancels that generator, and leaving the `Reply`
stops the generation on the worker. The first event is awaited before any answer is sent,
so a missing engine is a plain 503 (after CHAT_ENGINE_ACCEPT_TIMEOUT), not a broken stream.

Models are checkpoints, named `ckpt-<id>` (listed chat-tuned first, newest first); the
aliases `latest` (the first of that list) and `latest-<stage>` (`latest-sft`, ...) work too.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import wraps

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.views.decorators.csrf import csrf_exempt
from rest_framework.authtoken.models import Token

from chat import openai_format as fmt
from chat.openai_format import ApiError
from chat.protocol import Chunk, EngineError, Final, GenerationRequest, Reply
from chat.services import chat_limits, checkpoints_for_picker
from nanochat_site import limits
from runs.models import Checkpoint

MODEL_ID = re.compile(r"ckpt-(\d{1,18})")
AUTH_SCHEMES = ("bearer", "token")  # the OpenAI clients' scheme, and DRF's own

View = Callable[..., Awaitable[HttpResponse]]


def api_view(method: str) -> Callable[[View], View]:
    """An async view that answers every failure in OpenAI's error shape."""

    def decorate(view: View) -> View:
        @wraps(view)
        async def wrapper(request: HttpRequest, **kwargs) -> HttpResponse:
            try:
                if request.method != method:
                    raise ApiError(405, f"use {method} here", code="method_not_allowed")
                return await view(request, **kwargs)
            except ApiError as exc:
                response = JsonResponse(exc.body(), status=exc.status)
                if exc.status == 401:
                    response["WWW-Authenticate"] = 'Bearer realm="nanochat"'
                elif exc.status == 405:
                    response["Allow"] = method
                return response

        # Clients with a token send no CSRF token; a session is CSRF-checked in authenticate().
        return csrf_exempt(wrapper)

    return decorate


@api_view("GET")
async def models(request: HttpRequest) -> HttpResponse:
    await authenticate(request)
    data = [model_object(checkpoint) async for checkpoint in checkpoints_for_picker()]
    return JsonResponse({"object": "list", "data": data})


@api_view("GET")
async def model_detail(request: HttpRequest, name: str) -> HttpResponse:
    await authenticate(request)
    return JsonResponse(model_object(await find_checkpoint(name)))


@api_view("POST")
async def chat_completions(request: HttpRequest) -> HttpResponse:
    await authenticate(request)
    params = fmt.parse_completion(_json_body(request), chat_limits())
    checkpoint = await find_checkpoint(params.model)
    seed = params.seed if params.seed is not None else secrets.randbelow(2**31)
    generation = GenerationRequest(
        checkpoint_path=checkpoint.path,
        step=checkpoint.step,
        messages=params.messages,
        temperature=params.sampling.temperature,
        top_k=params.sampling.top_k,
        max_tokens=params.sampling.max_tokens,
        seed=seed,
    )
    reply = Completion(f"chatcmpl-{generation.id}", int(time.time()), model_id(checkpoint))
    events = _generate(generation)
    try:
        first = await anext(events)
    except EngineError as exc:
        raise engine_error(exc) from None
    if params.stream:
        stream = reply.stream(first, events, include_usage=params.include_usage)
        response = StreamingHttpResponse(stream, content_type="text/event-stream")
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"  # a proxy must pass each event on at once
        return response
    async with contextlib.aclosing(events):
        final = first
        try:
            async for event in events:
                final = event
        except EngineError as exc:
            raise engine_error(exc) from None
    return JsonResponse(reply.whole(final))


class Completion:
    """One reply's identity, and its events rendered as OpenAI objects."""

    def __init__(self, completion_id: str, created: int, model: str) -> None:
        self.id, self.created, self.model = completion_id, created, model

    def whole(self, final: Final) -> dict:
        counts = fmt.usage(final.prompt_tokens, final.completion_tokens)
        return fmt.completion(
            self.id, self.created, self.model, final.content, final.finish_reason, counts
        )

    async def stream(
        self, first: Chunk | Final, events: AsyncIterator[Chunk | Final], *, include_usage: bool
    ) -> AsyncIterator[bytes]:
        """Server-sent events: the role, the text as it comes, the finish reason, [DONE].

        Only the reply's text is streamed (not a calculator call's expression or output), so
        the streamed text adds up to the non-streaming reply's content.
        """
        async with contextlib.aclosing(events):
            yield self._chunk({"role": "assistant", "content": ""})
            try:
                async for event in _prepend(first, events):
                    if isinstance(event, Final):
                        yield self._chunk({}, event.finish_reason)
                        if include_usage:
                            counts = fmt.usage(event.prompt_tokens, event.completion_tokens)
                            yield _sse(fmt.usage_chunk(self.id, self.created, self.model, counts))
                    elif text := "".join(text for part, text in event.pieces if part == "text"):
                        yield self._chunk({"content": text})
            except EngineError as exc:
                # Too late for a status code: an error event, which OpenAI clients raise.
                yield _sse(engine_error(exc).body())
                return
        yield b"data: [DONE]\n\n"

    def _chunk(self, delta: dict, finish_reason: str | None = None) -> bytes:
        return _sse(fmt.chunk(self.id, self.created, self.model, delta, finish_reason))


def _sse(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


async def _generate(request: GenerationRequest) -> AsyncIterator[Chunk | Final]:
    """The reply's events; closing this early (a client gone) stops the generation."""
    async with Reply(request) as reply:
        async for event in reply:
            yield event


async def _prepend(first, rest: AsyncIterator) -> AsyncIterator:
    yield first
    async for item in rest:
        yield item


# ---- who is asking, and for which model -------------------------------------------------------


async def authenticate(request: HttpRequest):
    """The user of the request's API token, else of its session; ApiError 401 if neither."""
    header = request.headers.get("Authorization")
    if header:
        scheme, _, key = header.strip().partition(" ")
        if scheme.lower() not in AUTH_SCHEMES or not key.strip():
            raise _unauthorized("send the API token as 'Authorization: Bearer <token>'")
        token = await Token.objects.select_related("user").filter(key=key.strip()).afirst()
        if token is None or not token.user.is_active:
            raise _unauthorized("invalid API token")
        return token.user
    user = await request.auser()
    if not user.is_authenticated:
        raise _unauthorized(
            "missing API token: send 'Authorization: Bearer <token>' (get a token with "
            "POST /api/auth/token/)"
        )
    if request.method not in ("GET", "HEAD", "OPTIONS") and await _csrf_failure(request):
        raise ApiError(403, "CSRF check failed for a session-authenticated request",
                       type="permission_error", code="csrf_failed")  # fmt: skip
    return user


@sync_to_async
def _csrf_failure(request: HttpRequest) -> bool:
    """Django's CSRF check, as DRF applies it to session-authenticated API calls."""
    check = CsrfViewMiddleware(lambda _: None)
    check.process_request(request)
    return check.process_view(request, None, (), {}) is not None


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, message, code="invalid_api_key")


def model_id(checkpoint: Checkpoint) -> str:
    return f"ckpt-{checkpoint.pk}"


def model_object(checkpoint: Checkpoint) -> dict:
    """A checkpoint as an OpenAI model; stage, step and run ride along for people reading it."""
    return {
        "id": model_id(checkpoint),
        "object": "model",
        "created": int(checkpoint.created.timestamp()),
        "owned_by": "nanochat",
        "stage": checkpoint.stage,
        "step": checkpoint.step,
        "run": checkpoint.run_id,
    }


async def find_checkpoint(name: str) -> Checkpoint:
    checkpoints = checkpoints_for_picker()
    found = None
    if match := MODEL_ID.fullmatch(name):
        found = await checkpoints.filter(pk=int(match[1])).afirst()
    elif name == "latest":
        found = await checkpoints.afirst()
    elif name.startswith("latest-") and name[7:] in Checkpoint.Stage.values:
        found = await checkpoints.filter(stage=name[7:]).afirst()
    if found is None:
        raise ApiError(
            404,
            f"the model {name!r} does not exist: GET /v1/models lists the models",
            param="model",
            code="model_not_found",
        )
    return found


def engine_error(exc: EngineError) -> ApiError:
    message = str(exc)
    # The worker's words for a prompt longer than the model's context (chat/decode_loop.py).
    if "tokens long" in message:
        return ApiError(400, message, param="messages", code="context_length_exceeded")
    return ApiError(503, message, type="server_error", code="engine_unavailable")


def _json_body(request: HttpRequest):
    """The body as JSON, within API_MAX_BODY_BYTES and JSON_MAX_DEPTH (nanochat_site/limits.py);
    Django itself refuses to read a body whose Content-Length is over the limit."""
    try:
        return limits.parse_json(request.body or b"null")
    except RequestDataTooBig:
        raise ApiError(400, f"the body is larger than {settings.API_MAX_BODY_BYTES} bytes",
                       code="request_too_large") from None  # fmt: skip
    except limits.InputError as exc:
        raise ApiError(400, str(exc), code="invalid_json") from None
