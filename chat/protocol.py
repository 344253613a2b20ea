"""The messages between chat front ends and engine workers, and `Reply`, the one way to use them.

A front end (the chat websocket, an HTTP API view) never talks to a model itself. It opens a
`Reply`, which sends one `engine.generate` message to the engine channel of the channel layer
with a fresh reply channel of its own. Whichever engine worker takes the message answers there:

    engine.accepted  {worker, heartbeat}  first, naming the worker's own channel (for stop);
                                      heartbeat: it keeps a liveness key (chat/stats.py)
    engine.chunk     {pieces, choice, logprobs?} new text as it is generated, coalesced; each
                                      piece is [part, text] with part "text", "python" or
                                      "python_output"; logprobs (when asked): the entries of
                                      the tokens whose text this chunk releases (`logprobs`)
    engine.alive     {}               now and then while nothing else is sent (keepalive)
    engine.done      {content, parts, finish_reason, counts, timings, choice}   last (one
                                      per choice: a request for `n` samples gets n of them)
    engine.error     {message}        last, instead of done: nothing was generated

A request may ask for `n` choices (samples of one prefill, each a row of its own seeded
differently), for `stop` strings (the worker ends a choice's row at the first one, see
chat/stop.py) and, with `prompt`, for a raw text continuation without the chat template
(`messages` is then empty). Chunks and finals carry the `choice` they belong to (0..n-1).
With `logprobs` (0..20: how many alternatives per token) each chunk also carries, per token
of the reply's text it releases, `{token, bytes, logprob, top_logprobs: [{token, bytes,
logprob}], offset}` -- offset: where the token's text starts in the reply's text (see
chat/logprobs.py for which tokens are listed).

`engine.stop` sent to the worker's channel ends the reply early; the worker then answers with
engine.done (finish_reason "stopped") carrying the partial text. A fresh channel per reply
keeps replies apart (a late message of a stopped reply cannot leak into the next one) and lets
any async caller -- a websocket consumer or an async view streaming server-sent events --
drive a generation the same way:

    async with Reply(request) as reply:
        async for event in reply:        # Chunk ..., then one Final; EngineError on failure
            ...

A worker can die mid-reply (killed, out of memory, its machine gone) and say nothing. So while
a reply waits for its next message, it checks every CHAT_ENGINE_ALIVE_CHECK seconds that the
worker's liveness key still exists; one that expired (CHAT_ENGINE_ALIVE_TTL after the worker's
last heartbeat) ends the reply with EngineError within a few seconds. A request that no worker
has taken yet stays queued in Redis for any worker, a restarted one included.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any

import redis
from channels.exceptions import ChannelFull
from channels.layers import get_channel_layer
from django.conf import settings

from chat import stats

REQUEST = "engine.generate"
ACCEPTED = "engine.accepted"
CHUNK = "engine.chunk"
ALIVE = "engine.alive"
DONE = "engine.done"
ERROR = "engine.error"
STOP = "engine.stop"


class ProtocolError(ValueError):
    """A malformed message on the engine channel."""


class EngineError(Exception):
    """The engine could not produce a reply (no worker, unknown checkpoint, prompt too long)."""


WORKER_DIED = "the engine worker serving this reply stopped; try again"
REDIS_DOWN = (redis.RedisError, OSError)


@dataclass(frozen=True)
class GenerationRequest:
    """Everything a worker needs, with no database access: the checkpoint directory and step
    (resolved from the Checkpoint row by the front end), the conversation in the chat format
    of SPEC §3 (ending with the user's message), sampling settings and the reply's seed."""

    checkpoint_path: str
    step: int
    messages: list[dict[str, Any]]
    temperature: float
    top_k: int  # 0 = off
    max_tokens: int
    seed: int
    n: int = 1  # choices: rows sampled from one prefill
    stop: list[str] = field(default_factory=list)  # stop strings, matched on the decoded text
    prompt: str | None = None  # raw text to continue (no chat template); messages is then []
    logprobs: int | None = None  # None: none; k: each token's and its k likeliest alternatives'
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def as_message(self, reply_channel: str) -> dict[str, Any]:
        return {"type": REQUEST, "reply": reply_channel, **asdict(self)}

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> tuple[GenerationRequest, str]:
        """(request, reply channel); ProtocolError names what is wrong."""
        reply = message.get("reply")
        if not isinstance(reply, str) or not reply:
            raise ProtocolError("reply must be a channel name")
        checks = {
            "id": lambda v: isinstance(v, str) and bool(v),
            "checkpoint_path": lambda v: isinstance(v, str) and bool(v),
            "step": lambda v: _is_int(v) and v >= 0,
            "messages": lambda v: (
                isinstance(v, list) and (bool(v) or isinstance(message.get("prompt"), str))
            ),
            "temperature": lambda v: _is_number(v) and v >= 0,
            "top_k": lambda v: _is_int(v) and v >= 0,
            "max_tokens": lambda v: _is_int(v) and v >= 1,
            "seed": _is_int,
        }
        optional = {  # absent in messages from an older front end: the defaults
            "n": (1, lambda v: _is_int(v) and v >= 1),
            "stop": ([], lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v)),
            "prompt": (None, lambda v: v is None or isinstance(v, str)),
            "logprobs": (None, lambda v: v is None or (_is_int(v) and 0 <= v <= 20)),
        }
        values = {}
        for name, valid in checks.items():
            if not valid(message.get(name)):
                raise ProtocolError(f"{name} is missing or invalid: {message.get(name)!r}")
            values[name] = message[name]
        for name, (default, valid) in optional.items():
            value = message.get(name, default)
            if not valid(value):
                raise ProtocolError(f"{name} is invalid: {value!r}")
            values[name] = value
        return cls(**values), reply


@dataclass(frozen=True)
class Chunk:
    """New text of a reply: (part, text) pieces in order."""

    pieces: list[tuple[str, str]]
    choice: int = 0
    logprobs: list[dict[str, Any]] = field(default_factory=list)  # when the request asked

    @property
    def text(self) -> str:
        return "".join(text for _, text in self.pieces)


@dataclass(frozen=True)
class Final:
    """A finished reply and what its generation cost.

    completion_tokens counts every generated token (tool output forced in by the calculator
    and the closing stop token included); tokens_per_second is the decode speed from the first
    token to the last; time_to_first_token runs from the moment the worker took the request
    (model loading and prefill included); batch_rows is the most rows this reply shared a
    decode step with (itself included) -- 2 or more means continuous batching served it
    together with other replies.
    """

    content: str
    parts: list[dict[str, str]]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token: float | None
    tokens_per_second: float | None
    batch_rows: int
    choice: int = 0  # which of the request's n choices this is

    def as_message(self, request_id: str) -> dict[str, Any]:
        return {"type": DONE, "request": request_id, **asdict(self)}

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> Final:
        names = cls.__dataclass_fields__
        return cls(**{name: message.get(name) for name in names if name != "choice"},
                   choice=message.get("choice", 0))  # fmt: skip

    def stats(self) -> dict[str, Any]:
        """The numbers, without the text."""
        return {k: v for k, v in asdict(self).items() if k not in ("content", "parts", "choice")}


def accepted(request_id: str, worker_channel: str, heartbeat: bool = False) -> dict[str, Any]:
    return {
        "type": ACCEPTED,
        "request": request_id,
        "worker": worker_channel,
        "heartbeat": heartbeat,
    }


def chunk(
    request_id: str,
    pieces: list[tuple[str, str]],
    choice: int = 0,
    logprobs: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    message = {
        "type": CHUNK,
        "request": request_id,
        "pieces": [list(p) for p in pieces],
        "choice": choice,
    }
    if logprobs:
        message["logprobs"] = logprobs
    return message


def alive(request_id: str) -> dict[str, Any]:
    return {"type": ALIVE, "request": request_id}


def error(request_id: str, message: str) -> dict[str, Any]:
    return {"type": ERROR, "request": request_id, "message": message}


def stop(request_id: str) -> dict[str, Any]:
    return {"type": STOP, "request": request_id}


class Reply:
    """One generation on the engine, seen from the front end.

    Iterating yields `Chunk`s then one `Final` per choice (n of them, interleaved with other
    choices' chunks), or raises `EngineError`. `stop()` may be called
    at any time from another task; leaving the `async with` block before the end stops the
    generation too (a closed socket, a client that went away).
    """

    def __init__(
        self,
        request: GenerationRequest,
        *,
        layer=None,
        engine_channel: str | None = None,
        accept_timeout: float | None = None,
        idle_timeout: float | None = None,
    ) -> None:
        self.request = request
        self.layer = layer or get_channel_layer()
        self.engine_channel = engine_channel or settings.CHAT_ENGINE_CHANNEL
        self.accept_timeout = accept_timeout or settings.CHAT_ENGINE_ACCEPT_TIMEOUT
        self.idle_timeout = idle_timeout or settings.CHAT_ENGINE_IDLE_TIMEOUT
        self.channel: str | None = None
        self.worker: str | None = None  # the worker's own channel, once it took the request
        self.alive_check = settings.CHAT_ENGINE_ALIVE_CHECK
        self._liveness: stats.Liveness | None = None  # when the worker keeps a liveness key
        self._next: asyncio.Future | None = None  # the receive in progress, kept across checks
        self.finished = False
        self._finals = 0  # engine.done messages received: one per choice
        self._stop_wanted = False
        self._stop_sent = False

    async def __aenter__(self) -> Reply:
        # The default prefix, as every channel of this process: channels_redis reads all of a
        # process's private channels through one lock, and a reader of another prefix starves.
        self.channel = await self.layer.new_channel()
        try:
            await self.layer.send(self.engine_channel, self.request.as_message(self.channel))
        except ChannelFull:
            self.finished = True
            raise EngineError("the engine is busy (too many requests waiting); try again") from None
        return self

    async def __aexit__(self, *exc_info) -> None:
        try:
            if not self.finished:
                with contextlib.suppress(*REDIS_DOWN):
                    await self.stop()
        finally:
            if self._next is not None:
                self._next.cancel()
                await asyncio.gather(self._next, return_exceptions=True)
            if self._liveness is not None:
                await self._liveness.close()

    def __aiter__(self) -> AsyncIterator[Chunk | Final]:
        return self._events()

    async def stop(self) -> None:
        """Ask the worker to end the reply; the iteration then ends with a "stopped" Final.

        Before any worker has taken the request the wish is remembered and sent on acceptance.
        """
        self._stop_wanted = True
        if self.worker is None or self._stop_sent or self.finished:
            return
        self._stop_sent = True
        # A worker that cannot be reached now still ends the reply at its max_tokens.
        with contextlib.suppress(ChannelFull):
            await self.layer.send(self.worker, stop(self.request.id))

    async def _events(self) -> AsyncIterator[Chunk | Final]:
        while not self.finished:
            message = await self._receive()
            if message.get("request") != self.request.id:
                continue
            kind = message.get("type")
            if kind == ACCEPTED:
                self.worker = message["worker"]
                if message.get("heartbeat"):
                    self._liveness = stats.Liveness(self.engine_channel, self.worker)
                if self._stop_wanted:
                    await self.stop()
            elif kind == CHUNK:
                pieces = [(part, text) for part, text in message["pieces"]]
                yield Chunk(pieces, message.get("choice", 0), message.get("logprobs") or [])
            elif kind == DONE:
                self._finals += 1
                self.finished = self._finals >= self.request.n
                yield Final.from_message(message)
            elif kind == ERROR:
                self.finished = True
                raise EngineError(message.get("message") or "the engine failed")

    async def _receive(self) -> dict[str, Any]:
        """The next message on the reply channel; EngineError on a timeout or a dead worker."""
        waiting_for_worker = self.worker is None
        timeout = self.accept_timeout if waiting_for_worker else self.idle_timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self._next is None:
            # One receive spans the liveness checks: cancelling a channels_redis receive can
            # drop a message that is arriving at that moment.
            self._next = asyncio.ensure_future(self.layer.receive(self.channel))
        while True:
            left = deadline - loop.time()
            done, _ = await asyncio.wait([self._next], timeout=max(0, min(left, self.alive_check)))
            if done:
                received, self._next = self._next, None
                try:
                    return received.result()
                except REDIS_DOWN:
                    self.finished = True
                    raise EngineError("lost the connection to the engine; try again") from None
            if deadline - loop.time() <= 0:
                self.finished = True
                if waiting_for_worker:
                    raise EngineError(
                        f"no engine worker took the request within {timeout:g} s "
                        f"(are engine workers running?)"
                    )
                raise EngineError(f"the engine worker went silent for {timeout:g} s")
            if self._liveness is not None and not await self._liveness.alive():
                self.finished = True
                raise EngineError(WORKER_DIED)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
