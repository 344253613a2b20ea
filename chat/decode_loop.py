"""One loaded checkpoint and the decode loop that serves every reply asking for it.

Continuous batching: the loop drives one `engine.Batch`. Each turn it (1) cancels the rows of
replies that were stopped, (2) prefills waiting requests into free rows (`Batch.add`), and
(3) runs one `Batch.step` over every active row, feeding each row's new token to its reply.
So a request that arrives while others are mid-reply joins them at the next step instead of
waiting for them to finish, every row with its own prompt, sampling settings and seed.

A request for `n` choices is one `Generation` per choice, grouped: the group waits in the
queue until n rows are free, then joins with one prefill (`Batch.add_samples`: n rows, each
seeded differently). Each choice streams and finishes on its own; a choice whose text reaches
one of the request's stop strings (chat/stop.py) has its row cancelled at once. A request
with `logprobs` has its rows compute each token's log-probability, and each chunk carries the
entries of the tokens whose text it releases (chat/logprobs.py).

All torch work -- loading, prefill, step -- runs in one thread the loop owns (a Batch is
driven by a single thread), so the worker's event loop keeps taking requests and stop
messages and sending text while the model computes. The two never overlap on shared state:
the event loop awaits each thread call before it reads what the call changed, and between
calls the thread is idle. Other tasks touch only the waiting queue and `stop_requested`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import torch

from chat.logprobs import LogprobTracker, TokenTexts
from chat.protocol import Final, GenerationRequest
from chat.protocol import chunk as chunk_message
from chat.protocol import error as error_message
from chat.reply import ReplyBuilder
from chat.stop import StopMatcher
from engine.checkpoint import load_model, load_tokenizer_for
from engine.engine import Batch, FinishReason, Row, SamplingParams

log = logging.getLogger("chat.engine")

# All replies of one model together get at most about this many chunk messages a second.
MAX_CHUNKS_PER_SECOND = 100

_FINISH = {
    FinishReason.STOP: "stop",
    FinishReason.LENGTH: "length",
    FinishReason.CANCELLED: "stopped",
}


class ModelKey(NamedTuple):
    path: str
    step: int


@dataclass(eq=False)
class Generation:
    """One request inside a worker, from the moment it is taken to its final message."""

    request: GenerationRequest
    reply_channel: str
    choice: int = 0
    # The request's choices in order, this one among them (the first one stands for them all).
    group: list[Generation] = field(default_factory=list, repr=False)
    accepted_at: float = field(default_factory=time.monotonic)
    loop: ModelLoop | None = None
    row: Row | None = None
    builder: ReplyBuilder | None = None
    stopper: StopMatcher | None = None  # when the request has stop strings
    logprobs: LogprobTracker | None = None  # when the request asks for logprobs
    done: bool = False  # its final (or error) is sent
    slots: int = 0  # the first choice: worker slots its request holds (one per live choice)
    stop_requested: bool = False
    first_token_at: float | None = None
    last_token_at: float | None = None
    batch_rows: int = 0  # the most rows decoded in one step together with this one
    pending: list[tuple[str, str]] = field(default_factory=list)  # text not yet sent
    pending_logprobs: list[dict[str, Any]] = field(default_factory=list)  # its tokens' entries
    chunks_sent: int = 0
    last_chunk_at: float = 0.0
    last_sent_at: float = field(default_factory=time.monotonic)  # any message (keepalive)

    def __post_init__(self) -> None:
        if not self.group:
            self.group = [self]

    @classmethod
    def for_request(cls, request: GenerationRequest, reply_channel: str) -> Generation:
        """The first choice of a request, with its n - 1 siblings in `group`."""
        first = cls(request, reply_channel)
        first.group += [
            cls(request, reply_channel, choice=i, group=first.group) for i in range(1, request.n)
        ]
        for gen in first.group:
            gen.accepted_at = first.accepted_at
        return first

    @property
    def key(self) -> ModelKey:
        return ModelKey(self.request.checkpoint_path, self.request.step)

    def time_to_first_token(self) -> float | None:
        """Seconds from the worker taking the request to this choice's first token."""
        return None if self.first_token_at is None else self.first_token_at - self.accepted_at

    def decode_speed(self) -> float | None:
        """Tokens per second after the first (whose time is the prefill's), None below two."""
        completion = self.row.num_generated if self.row is not None else 0
        if completion > 1 and self.last_token_at and self.last_token_at > self.first_token_at:
            return (completion - 1) / (self.last_token_at - self.first_token_at)
        return None

    def final(self, finish_reason: str) -> Final:
        row, builder = self.row, self.builder
        completion = row.num_generated if row is not None else 0
        speed = self.decode_speed()
        ttft = self.time_to_first_token()
        content = builder.content if builder else ""
        if self.stopper is not None:
            content = self.stopper.text
        return Final(
            content=content,
            parts=builder.parts if builder else [],
            finish_reason=finish_reason,
            prompt_tokens=row.prompt_len if row is not None else 0,
            completion_tokens=completion,
            time_to_first_token=None if ttft is None else round(ttft, 4),
            tokens_per_second=None if speed is None else round(speed, 2),
            batch_rows=self.batch_rows,
            choice=self.choice,
        )


class LoopOwner(Protocol):
    """What a loop needs from its worker."""

    def emit(self, gen: Generation, message: dict[str, Any]) -> None: ...
    def finished(self, gen: Generation, final: Final | None) -> None: ...
    def loop_idle(self, loop: ModelLoop) -> None: ...
    def loop_failed(self, loop: ModelLoop) -> None: ...


@dataclass
class _Turn:
    """What one thread call did, for the event loop to report."""

    rejected: list[tuple[Generation, str]] = field(default_factory=list)
    finished: list[tuple[Generation, str]] = field(default_factory=list)
    tokens: int = 0


class ModelLoop:
    def __init__(
        self,
        key: ModelKey,
        owner: LoopOwner,
        *,
        device: torch.device,
        max_rows: int,
        chunk_interval: float,
        cuda_graphs: bool = False,
    ) -> None:
        self.key = key
        self._cuda_graphs = cuda_graphs
        self._owner = owner
        self._device = device
        self._max_rows = max_rows
        self._chunk_interval = chunk_interval
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")
        self._queue: deque[Generation] = deque()  # taken, waiting for a row
        self._active: list[Generation] = []  # holding a row of the batch
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._model = self._tokenizer = None
        self._texts: TokenTexts | None = None
        self._batch: Batch | None = None
        self.ready = False
        self.tokens_served = 0

    # ---- used by the worker (event loop) ------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"decode {self.key.path}")

    def submit(self, gen: Generation) -> None:
        for member in gen.group:
            member.loop = self
        self._queue.append(gen)
        self._wake.set()

    def stop(self, gen: Generation) -> None:
        """End `gen` early: at once if it has no row yet, else at the next step (also when it
        is joining the batch in the thread right now)."""
        for member in gen.group:
            member.stop_requested = True
        if gen in self._queue:
            self._queue.remove(gen)
            for member in gen.group:
                self._finish(member, "stopped")
            self._became_idle_maybe()
        else:
            self._wake.set()

    @property
    def idle(self) -> bool:
        return self.ready and not self._queue and not self._active

    def stats(self) -> dict[str, Any]:
        return {
            "checkpoint": self.key.path,
            "step": self.key.step,
            "state": "ready" if self.ready else "loading",
            "active_rows": len(self._active),
            "queued": len(self._queue),
            "tokens_served": self.tokens_served,
        }

    def close(self) -> None:
        """Drop the model (the loop must be idle, or the worker shutting down)."""
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._batch = self._model = self._tokenizer = None
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    def fail_all(self, message: str) -> None:
        """Answer every reply of this loop with an error (shutdown, crash)."""
        for gen in [*(member for first in self._queue for member in first.group), *self._active]:
            self._owner.emit(gen, error_message(gen.request.id, message))
            self._owner.finished(gen, None)
        self._queue.clear()
        self._active.clear()

    # ---- the loop -----------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            await self._in_thread(self._load)
        except Exception as exc:  # a bad checkpoint fails its requests, not the worker
            log.warning("cannot load %s step %s: %s", self.key.path, self.key.step, exc)
            self._owner.loop_failed(self)
            self.fail_all(f"cannot load checkpoint {self.key.path} step {self.key.step}: {exc}")
            self.close()
            return
        self.ready = True
        while True:
            if not self._queue and not self._active:
                self._became_idle_maybe()
                if not self._queue:
                    self._wake.clear()
                    await self._wake.wait()
                continue
            cancels = [gen for gen in self._active if gen.stop_requested]
            room = self._batch.free_rows + len(cancels)
            joins = []
            # In order: a request for n choices waits for n free rows (later ones wait behind).
            while self._queue and len(self._queue[0].group) <= room:
                room -= len(self._queue[0].group)
                joins.append(self._queue.popleft())
            if not joins and not self._active and self._queue:
                first = self._queue.popleft()  # more choices than the batch has rows at all
                self._report(_Turn(rejected=[(first, self._too_many(first))]))
                continue
            try:
                turn = await self._in_thread(self._advance, joins, cancels)
            except Exception as exc:
                log.exception("decode step failed on %s step %s", self.key.path, self.key.step)
                self._queue.extend(gen for gen in joins if gen.row is None)
                self.fail_all(f"the engine failed: {exc}")
                await self._in_thread(self._new_batch)
                continue
            self.tokens_served += turn.tokens
            self._report(turn)

    async def _in_thread(self, function: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    def _became_idle_maybe(self) -> None:
        if self.idle:
            self._owner.loop_idle(self)

    def _report(self, turn: _Turn) -> None:
        for first, message in turn.rejected:
            for gen in first.group:
                self._owner.emit(gen, error_message(gen.request.id, message))
                self._owner.finished(gen, None)
        now = time.monotonic()
        # The worker's messages per second stay bounded however many rows decode together:
        # each one costs CPU in this process, in Redis and in the web process.
        interval = max(self._chunk_interval, len(self._active) / MAX_CHUNKS_PER_SECOND)
        for gen in self._active:
            due = gen.chunks_sent == 0 or now - gen.last_chunk_at >= interval
            if (gen.pending or gen.pending_logprobs) and due:
                self._send_pending(gen, now)
        for gen, reason in turn.finished:
            self._finish(gen, reason)

    def _finish(self, gen: Generation, reason: str) -> None:
        if gen.pending or gen.pending_logprobs:
            self._send_pending(gen, time.monotonic())
        final = gen.final(reason)
        self._owner.emit(gen, final.as_message(gen.request.id))
        self._owner.finished(gen, final)

    def _send_pending(self, gen: Generation, now: float) -> None:
        merged: list[tuple[str, str]] = []
        for part, text in gen.pending:
            if merged and merged[-1][0] == part:
                merged[-1] = (part, merged[-1][1] + text)
            else:
                merged.append((part, text))
        logprobs, gen.pending, gen.pending_logprobs = gen.pending_logprobs, [], []
        gen.chunks_sent += 1
        gen.last_chunk_at = now
        self._owner.emit(gen, chunk_message(gen.request.id, merged, gen.choice, logprobs))

    def _too_many(self, first: Generation) -> str:
        return (
            f"n={len(first.group)} asks for more choices than this engine worker decodes "
            f"together (at most {self._max_rows} rows)"
        )

    # ---- in the loop's thread -----------------------------------------------------------

    def _load(self) -> None:
        started = time.monotonic()
        if self._device.type == "cuda":
            # The current device is per thread: make it this worker's GPU in the thread that
            # runs every kernel, so nothing lands on GPU 0 by default.
            torch.cuda.set_device(self._device)
        model, _ = load_model(self.key.path, self.key.step, device=self._device)
        self._tokenizer = load_tokenizer_for(self.key.path)
        self._texts = TokenTexts(self._tokenizer)
        self._model = model
        self._new_batch()
        log.info(
            "loaded %s step %s on %s in %.1f s",
            self.key.path, self.key.step, self._device, time.monotonic() - started,
        )  # fmt: skip

    def _new_batch(self) -> None:
        self._batch = Batch(
            self._model, self._tokenizer, max_rows=self._max_rows, cuda_graphs=self._cuda_graphs
        )

    def _advance(self, joins: list[Generation], cancels: list[Generation]) -> _Turn:
        """One turn: the cancels and joins, then decode steps -- more than one while nothing
        waits for the event loop (no request queued, no stop asked, every reply past its first
        chunk) and less than a chunk interval has passed, so the thread hand-off and the GIL
        hand-over to the event loop are paid per chunk, not per token."""
        turn = self._step(joins, cancels)
        started = time.monotonic()
        while (
            self._batch.rows
            and not self._queue
            and time.monotonic() - started < self._chunk_interval
            and all(not gen.stop_requested and gen.chunks_sent for gen in self._active)
        ):
            more = self._step([], [])
            turn.rejected += more.rejected
            turn.finished += more.finished
            turn.tokens += more.tokens
        return turn

    def _step(self, joins: list[Generation], cancels: list[Generation]) -> _Turn:
        turn = _Turn()
        batch = self._batch
        for gen in cancels:
            batch.cancel(gen.row)
            self._leave(gen, turn, "stopped")
        for gen in joins:
            try:
                self._join(gen)
            except ValueError as exc:
                turn.rejected.append((gen, str(exc)))
        if not batch.rows:
            return turn
        rows = len(batch.rows)
        by_row = {gen.row: gen for gen in self._active}
        events = batch.step()
        now = time.monotonic()
        turn.tokens = len(events)
        for row, token, _mask in events:
            gen = by_row[row]
            if gen.first_token_at is None:
                gen.first_token_at = now
            gen.last_token_at = now
            gen.batch_rows = max(gen.batch_rows, rows)
            if gen.logprobs is not None:
                gen.logprobs.token(token, row.logprobs[-1])
            self._add_text(gen, gen.builder.feed(token))
            if gen.stopper is not None and gen.stopper.matched is not None:
                if not row.done:
                    batch.cancel(row)  # its stop string: no more compute for this choice
                self._leave(gen, turn, "stop")
            elif row.done:
                self._leave(gen, turn, _FINISH[row.finish_reason])
        return turn

    def _join(self, gen: Generation) -> None:
        request = gen.request
        if request.prompt is not None:  # a raw continuation: the text as is, after BOS
            bos = self._tokenizer.get_bos_token_id()
            prompt = self._tokenizer.encode(request.prompt, prepend=bos)
        else:
            prompt = self._tokenizer.render_for_completion({"messages": request.messages})
        limit = self._batch.max_len
        if len(prompt) >= limit:
            what = "conversation" if request.prompt is None else "prompt"
            raise ValueError(
                f"the {what} is {len(prompt)} tokens long and this model reads at most "
                f"{limit}: start a new conversation or shorten it"
            )
        if len(gen.group) > self._batch.max_rows:
            raise ValueError(self._too_many(gen))
        params = SamplingParams(
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_k=request.top_k or None,
            seed=request.seed,
            logprobs=request.logprobs,
        )
        rows = self._batch.add_samples(prompt, params, len(gen.group))
        for member, row in zip(gen.group, rows, strict=True):
            member.row = row
            member.builder = ReplyBuilder(self._tokenizer)
            if request.stop:
                member.stopper = StopMatcher(request.stop)
            if request.logprobs is not None:
                member.logprobs = LogprobTracker(self._texts)
            self._active.append(member)

    def _add_text(self, gen: Generation, pieces: list[tuple[str, str]]) -> None:
        """Queue `pieces` to send, the text through the stop matcher when there is one, and
        the entries of the tokens whose text goes out with them."""
        stopper, tracker = gen.stopper, gen.logprobs
        for part, text in pieces:
            if stopper is not None and stopper.matched is not None:
                break
            if tracker is not None and part == "text":
                tracker.text(len(text))
            if stopper is not None and part == "text":
                text = stopper.feed(text)
            if text:
                gen.pending.append((part, text))
        self._release_logprobs(gen)

    def _release_logprobs(self, gen: Generation) -> None:
        if gen.logprobs is not None:
            shown = gen.logprobs.produced if gen.stopper is None else gen.stopper.shown
            gen.pending_logprobs += gen.logprobs.release(shown)

    def _leave(self, gen: Generation, turn: _Turn, reason: str) -> None:
        self._add_text(gen, gen.builder.finish())
        if gen.stopper is not None and gen.stopper.matched is None:
            gen.pending.append(("text", gen.stopper.flush()))
            self._release_logprobs(gen)
        gen.pending = [(part, text) for part, text in gen.pending if text]
        if gen.stopper is not None and gen.stopper.matched is not None:
            reason = "stop"  # the stop string came with the row's last token
        self._active.remove(gen)
        turn.finished.append((gen, reason))
