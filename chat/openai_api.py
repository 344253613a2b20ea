"""The OpenAI-compatible API: `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions`.

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
aliases `latest` (the first of that list) and `latest-<stage>` (`latest-sft`, ...) work too,
and are listed after the checkpoints with `alias_of` naming the checkpoint they stand for.
`run-<id>` follows a run (running ones too): each request is answered by the checkpoint the
run saved last when the request came, and is listed (per run that saved one) with `alias_of`
naming that checkpoint. Every response's `model` is the checkpoint that answered
(`ckpt-<id>`, whatever alias was asked for); GET /v1/models/ckpt-<id> gives its step.

`n` choices are one engine request of n rows (one prefill); `/v1/completions` with a list of
prompts sends one request per prompt, all at once, and numbers the choices prompt by prompt.
Stop strings are matched by the worker (chat/stop.py), which cancels a choice's row there.
Logprobs are computed by the worker for the rows of a request that asks (chat/logprobs.py says
which tokens are listed); each chunk carries the entries of the tokens whose text it carries,
and the whole answer gathers them per choice.
Any other path under /v1/ answers 404 in the same error shape (`unknown_path`).
"""

from __future__ import annotations

import asyncio
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
from chat.openai_format import ApiError, CompletionParams, TextCompletionParams
from chat.protocol import Chunk, EngineError, Final, GenerationRequest, Reply
from chat.services import chat_limits, checkpoints_for_picker
from nanochat_site import limits
from runs import selectors
from runs.models import Checkpoint

MODEL_ID = re.compile(r"ckpt-(\d{1,18})")
RUN_ID = re.compile(r"run-(\d{1,18})")
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
    data, aliases = [], {}
    async for checkpoint in checkpoints_for_picker():
        data.append(model_object(checkpoint))
        aliases.setdefault("latest", checkpoint)
        aliases.setdefault(f"latest-{checkpoint.stage}", checkpoint)
    data += [model_object(checkpoint, alias) for alias, checkpoint in aliases.items()]
    followed = await sync_to_async(selectors.followable_runs)()
    data += [model_object(checkpoint, f"run-{run.pk}") for run, checkpoint in followed]
    return JsonResponse({"object": "list", "data": data})


@api_view("GET")
async def model_detail(request: HttpRequest, name: str) -> HttpResponse:
    await authenticate(request)
    checkpoint = await find_checkpoint(name)
    return JsonResponse(model_object(checkpoint, None if MODEL_ID.fullmatch(name) else name))


@api_view("POST")
async def chat_completions(request: HttpRequest) -> HttpResponse:
    await authenticate(request)
    params = fmt.parse_completion(_json_body(request), chat_limits())
    checkpoint = await find_checkpoint(params.model)
    generation = _request(checkpoint, params, messages=params.messages)
    reply = ChatAnswer(f"chatcmpl-{generation.id}", model_id(checkpoint), params.n)
    reply.with_logprobs = params.logprobs is not None
    return await _answer(reply, [generation], params, "messages")


@api_view("POST")
async def completions(request: HttpRequest) -> HttpResponse:
    """Legacy completions: raw text continued, without the chat template (any checkpoint)."""
    await authenticate(request)
    params = fmt.parse_text_completion(_json_body(request), chat_limits())
    checkpoint = await find_checkpoint(params.model)
    generations = [_request(checkpoint, params, prompt=prompt) for prompt in params.prompts]
    answer = TextAnswer(
        f"cmpl-{generations[0].id}", model_id(checkpoint), params.n, params.prompts, params.echo
    )
    answer.with_logprobs = params.logprobs is not None
    return await _answer(answer, generations, params, "prompt")


@csrf_exempt
async def unknown(request: HttpRequest, rest: str = "") -> HttpResponse:
    """Any other path under /v1/: a 404 in OpenAI's error shape, not an HTML page."""
    if rest.strip("/") == "embeddings":
        message = "embeddings are not offered by this server (nanochat serves text generation)"
    else:
        message = (
            f"unknown path {request.method} {request.path}: this server offers /v1/models, "
            f"/v1/chat/completions and /v1/completions"
        )
    return JsonResponse(ApiError(404, message, code="unknown_path").body(), status=404)


def _request(
    checkpoint: Checkpoint,
    params: CompletionParams | TextCompletionParams,
    *,
    messages: list | None = None,
    prompt: str | None = None,
) -> GenerationRequest:
    seed = params.seed if params.seed is not None else secrets.randbelow(2**31)
    return GenerationRequest(
        checkpoint_path=checkpoint.path,
        step=checkpoint.step,
        messages=messages or [],
        temperature=params.sampling.temperature,
        top_k=params.sampling.top_k,
        max_tokens=params.sampling.max_tokens,
        seed=seed,
        n=params.n,
        stop=list(params.stop),
        prompt=prompt,
        logprobs=params.logprobs,
    )


async def _answer(
    answer: Answer,
    generations: list[GenerationRequest],
    params: CompletionParams | TextCompletionParams,
    prompt_param: str,
) -> HttpResponse:
    """Run the generations; the whole answer, or a stream of server-sent events."""
    events = _merged(generations)
    try:
        first = await anext(events)
    except EngineError as exc:
        raise engine_error(exc, prompt_param) from None
    if params.stream:
        stream = answer.stream(first, events, include_usage=params.include_usage)
        response = StreamingHttpResponse(stream, content_type="text/event-stream")
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"  # a proxy must pass each event on at once
        return response
    finals: dict[int, Final] = {}
    logprobs: dict[int, list[dict]] = {}
    async with contextlib.aclosing(events):
        try:
            async for index, event in _prepend(first, events):
                if isinstance(event, Final):
                    finals[index] = event
                else:
                    logprobs.setdefault(index, []).extend(event.logprobs)
        except EngineError as exc:
            raise engine_error(exc, prompt_param) from None
    if not answer.with_logprobs:
        return JsonResponse(answer.whole(finals))
    return JsonResponse(answer.whole(finals, [logprobs.get(i, []) for i in sorted(finals)]))


class Answer:
    """One answer's identity, and its events rendered as OpenAI objects (a subclass each)."""

    chunk_object = "chat.completion.chunk"
    with_logprobs = False  # whether the request asked for logprobs

    def __init__(self, completion_id: str, model: str, n: int, prompts: int = 1) -> None:
        self.id, self.created, self.model = completion_id, int(time.time()), model
        self.per_prompt = n
        self.choices = n * prompts  # how many, all prompts together

    def usage(self, finals: dict[int, Final]) -> dict[str, int]:
        """Token counts: each prompt once (its choices share the prefill), every choice's
        generated tokens."""
        prompt = sum(f.prompt_tokens for i, f in finals.items() if i % self.per_prompt == 0)
        return fmt.usage(prompt, sum(final.completion_tokens for final in finals.values()))

    def whole(self, finals: dict[int, Final], logprobs: list[list[dict]] | None = None) -> dict:
        """The whole answer; `logprobs`: each choice's token entries, when asked for."""
        raise NotImplementedError

    def opening(self, index: int) -> dict | None:
        return None

    def piece(self, index: int, text: str, logprobs: list[dict]) -> dict:
        raise NotImplementedError

    def closing(self, index: int, finish_reason: str) -> dict:
        raise NotImplementedError

    async def stream(
        self,
        first: tuple[int, Chunk | Final],
        events: AsyncIterator[tuple[int, Chunk | Final]],
        *,
        include_usage: bool,
    ) -> AsyncIterator[bytes]:
        """Server-sent events: an opening per choice, the text as it comes (each chunk naming
        its choice's index), each choice's finish reason, the usage if asked, [DONE].

        Only the reply's text is streamed (not a calculator call's expression or output), so
        the streamed text adds up to the non-streaming reply's content.
        """
        finals: dict[int, Final] = {}
        async with contextlib.aclosing(events):
            for index in range(self.choices):
                if (opening := self.opening(index)) is not None:
                    yield _sse(opening)
            try:
                async for index, event in _prepend(first, events):
                    if isinstance(event, Final):
                        finals[index] = event
                        yield _sse(self.closing(index, event.finish_reason))
                    elif text := "".join(text for part, text in event.pieces if part == "text"):
                        logprobs = event.logprobs if self.with_logprobs else None
                        yield _sse(self.piece(index, text, logprobs))
            except EngineError as exc:
                # Too late for a status code: an error event, which OpenAI clients raise.
                yield _sse(engine_error(exc).body())
                return
            if include_usage:
                counts = self.usage(finals)
                yield _sse(fmt.usage_chunk(self.id, self.created, self.model, counts,
                                           self.chunk_object))  # fmt: skip
        yield b"data: [DONE]\n\n"


class ChatAnswer(Answer):
    def whole(self, finals: dict[int, Final], logprobs: list[list[dict]] | None = None) -> dict:
        contents = [(finals[i].content, finals[i].finish_reason) for i in sorted(finals)]
        counts = self.usage(finals)
        return fmt.completion(self.id, self.created, self.model, contents, counts, logprobs)

    def opening(self, index: int) -> dict:
        return self._chunk(index, {"role": "assistant", "content": ""})

    def piece(self, index: int, text: str, logprobs: list[dict] | None) -> dict:
        return self._chunk(index, {"content": text}, logprobs=logprobs)

    def closing(self, index: int, finish_reason: str) -> dict:
        return self._chunk(index, {}, finish_reason)

    def _chunk(
        self,
        index: int,
        delta: dict,
        finish_reason: str | None = None,
        logprobs: list[dict] | None = None,
    ) -> dict:
        return fmt.chunk(self.id, self.created, self.model, delta, finish_reason, index, logprobs)


class TextAnswer(Answer):
    chunk_object = "text_completion"

    def __init__(self, completion_id: str, model: str, n: int, prompts: list[str], echo: bool):
        super().__init__(completion_id, model, n, len(prompts))
        # Per choice, the prompt to show first (echo: true).
        self.echoes = [prompt for prompt in prompts for _ in range(n)] if echo else None

    def whole(self, finals: dict[int, Final], logprobs: list[list[dict]] | None = None) -> dict:
        texts = [(self._echo(i) + finals[i].content, finals[i].finish_reason)
                 for i in sorted(finals)]  # fmt: skip
        counts = self.usage(finals)
        return fmt.text_completion(self.id, self.created, self.model, texts, counts, logprobs)

    def opening(self, index: int) -> dict | None:
        if not self.echoes:
            return None
        return fmt.text_chunk(self.id, self.created, self.model, self._echo(index), None, index)

    def piece(self, index: int, text: str, logprobs: list[dict] | None) -> dict:
        return fmt.text_chunk(self.id, self.created, self.model, text, None, index, logprobs)

    def closing(self, index: int, finish_reason: str) -> dict:
        return fmt.text_chunk(self.id, self.created, self.model, "", finish_reason, index)

    def _echo(self, index: int) -> str:
        return self.echoes[index] if self.echoes else ""


def _sse(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


async def _generate(request: GenerationRequest) -> AsyncIterator[Chunk | Final]:
    """The reply's events; closing this early (a client gone) stops the generation."""
    async with Reply(request) as reply:
        async for event in reply:
            yield event


async def _merged(requests: list[GenerationRequest]) -> AsyncIterator[tuple[int, Chunk | Final]]:
    """(choice index, event) of all the requests, as they come; request k's choices are
    numbered from k * n. Closing this early stops every generation still running."""
    if len(requests) == 1:
        async with contextlib.aclosing(_generate(requests[0])) as events:
            async for event in events:
                yield event.choice, event
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(offset: int, request: GenerationRequest) -> None:
        try:
            async with contextlib.aclosing(_generate(request)) as events:
                async for event in events:
                    await queue.put((offset + event.choice, event))
        except EngineError as exc:
            await queue.put(exc)
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(k * r.n, r)) for k, r in enumerate(requests)]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, EngineError):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


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


def model_object(checkpoint: Checkpoint, alias: str | None = None) -> dict:
    """A checkpoint as an OpenAI model; stage, step and run ride along for people reading it.
    An alias (`latest`, `latest-sft`...) is a model too, with `alias_of` naming its checkpoint."""
    extra = {} if alias is None else {"alias_of": model_id(checkpoint)}
    return {
        "id": alias or model_id(checkpoint),
        **extra,
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
    elif match := RUN_ID.fullmatch(name):
        found = await sync_to_async(selectors.newest_checkpoint)(int(match[1]))
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


def engine_error(exc: EngineError, prompt_param: str = "messages") -> ApiError:
    message = str(exc)
    # The worker's words for a prompt longer than the model's context (chat/decode_loop.py).
    if "tokens long" in message:
        return ApiError(400, message, param=prompt_param, code="context_length_exceeded")
    # ... and for more choices than it has rows (chat/engine_worker.py).
    if "asks for more choices" in message:
        return ApiError(400, message, param="n", code="invalid_value")
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
