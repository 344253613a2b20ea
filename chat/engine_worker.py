"""The engine worker: takes generation requests from the channel layer and streams replies back.

Run one per GPU with `python manage.py engine_worker`; any number of them on one Redis share
the engine channel. A worker pulls a request only while it has a free row (fewer than
`max_rows` replies in progress), so a busy worker leaves new requests in Redis for an idle
one instead of hoarding them -- which is why this is its own loop rather than Channels'
`runworker`, whose listener takes every message as soon as it arrives. A request waiting in
Redis for a free row is exactly SPEC §12's "requests wait for a free replica".

Per request the worker answers on the request's reply channel (see chat/protocol.py): first
`engine.accepted` with the worker's own channel, where the front end sends `engine.stop`; then
chunks, then done (one per choice). A request for n choices holds n of the `max_rows` slots:
the worker takes it and then waits for n - 1 more free slots before taking anything else (more
than `max_rows` choices is refused at once). Models are loaded on demand into a small LRU
(chat/models_cache.py), each with its decode loop (chat/decode_loop.py); requests for a
model that cannot be loaded yet (every cached model busy) wait in the worker until one goes
idle. Every second the worker publishes its stats to Redis (chat/stats.py) and sends a
keepalive to replies that have had no message for a while, so a front end can tell a slow
reply from a dead worker. Each finished reply adds its time to first token and decode speed to
two in-memory histograms that go out with those stats (for /metrics). The stats key expires CHAT_ENGINE_ALIVE_TTL seconds after the last
write: a front end whose worker's key is gone knows the worker died (chat/protocol.py) and
says so within seconds.

Redis going away (restarted, a network blip) does not stop the worker: every receive and send
waits and retries with backoff until Redis answers again, and requests still queued there are
taken when it does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections import deque
from typing import Any

import redis
import torch
from channels.exceptions import ChannelFull
from django.conf import settings

from chat.decode_loop import Generation, ModelKey, ModelLoop
from chat.models_cache import ModelCache
from chat.protocol import (
    STOP,
    Final,
    GenerationRequest,
    ProtocolError,
    accepted,
    alive,
    error,
)
from chat.stats import DECODE_SPEED_BUCKETS, TTFT_BUCKETS, ReplyHistogram, StatsPublisher

log = logging.getLogger("chat.engine")

# A reply that has been sent nothing for this long gets an `engine.alive` (front ends give up
# after CHAT_ENGINE_IDLE_TIMEOUT of silence, 30 s by default).
KEEPALIVE_SECONDS = 5.0
# How long a stopping worker waits for its tasks (e.g. one blocked in a 5 s Redis pop).
SHUTDOWN_GRACE_SECONDS = 6.0
# While Redis is unreachable, calls are retried after this long, doubling up to the maximum.
RECONNECT_FIRST_SECONDS = 0.5
RECONNECT_MAX_SECONDS = 5.0
REDIS_DOWN = (redis.RedisError, OSError)


class EngineWorker:
    def __init__(
        self,
        layer,
        *,
        channel: str,
        device: torch.device,
        max_rows: int,
        max_models: int,
        chunk_interval: float,
        stats_interval: float,
        redis_url: str | None = None,
        cuda_graphs: bool = False,
    ) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, got {max_rows}")
        self.layer = layer
        self.channel = channel
        self.device = device
        # Read once, here: the stats tick must not call into CUDA beside the decode thread.
        self.device_details = device_details(device)
        self.cuda_graphs = cuda_graphs
        self.max_rows = max_rows
        self.chunk_interval = chunk_interval
        self.stats_interval = stats_interval
        self._redis_url = redis_url
        self.name = ""  # the worker's own channel, set in run()
        self._cache: ModelCache[ModelKey, ModelLoop] = ModelCache(
            max_models, is_idle=lambda loop: loop.idle, evict=self._evict
        )
        self._inflight: dict[str, Generation] = {}  # request id -> its first choice
        self._waiting: deque[Generation] = deque()  # taken, no model slot yet
        # (reply channel, message, request id to stop if that channel is abandoned)
        self._outbox: asyncio.Queue[tuple[str, dict[str, Any], str | None]] = asyncio.Queue()
        self._slots: asyncio.Semaphore | None = None
        self._started = time.time()
        self.requests_served = 0
        self._evicted_tokens = 0  # tokens served by models no longer loaded
        self.ttft = ReplyHistogram(TTFT_BUCKETS)  # per request: its earliest choice
        self.decode_speed = ReplyHistogram(DECODE_SPEED_BUCKETS)  # per choice
        self._closing = False

    async def run(self) -> None:
        """Serve until cancelled; then answer every reply in progress with an error."""
        self.name = await self.layer.new_channel()
        self._slots = asyncio.Semaphore(self.max_rows)
        publisher = None
        if self._redis_url:
            ttl = max(settings.CHAT_ENGINE_ALIVE_TTL, 2 * self.stats_interval)
            publisher = StatsPublisher(self._redis_url, self.channel, self.name, ttl)
        log.info(
            "engine worker %s on %s (%s): channel %r, %d rows, %d models%s",
            self.name, self.device, self.device_details.get("device_name", "host"),
            self.channel, self.max_rows, self._cache.capacity,
            ", CUDA graphs" if self.cuda_graphs else "",
        )  # fmt: skip
        sender = asyncio.create_task(self._send_loop(), name="send")
        listeners = [
            asyncio.create_task(self._intake(), name="intake"),
            asyncio.create_task(self._control(), name="control"),
            asyncio.create_task(self._tick(publisher), name="tick"),
        ]
        try:
            done, _ = await asyncio.wait([sender, *listeners], return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()  # a crashed task stops the worker, loudly
        finally:
            await self._shutdown(sender, listeners, publisher)

    # ---- called by the decode loops -----------------------------------------------------

    def emit(self, gen: Generation, message: dict[str, Any]) -> None:
        gen.last_sent_at = time.monotonic()
        self._outbox.put_nowait((gen.reply_channel, message, gen.request.id))

    def finished(self, gen: Generation, final: Final | None) -> None:
        if gen.done or gen.request.id not in self._inflight:
            return
        gen.done = True
        first = gen.group[0]
        if first.slots:
            first.slots -= 1
            self._slots.release()
        if final is not None and (speed := gen.decode_speed()) is not None:
            self.decode_speed.observe(speed)
        if all(member.done for member in gen.group):
            del self._inflight[gen.request.id]
            if final is not None:
                self.requests_served += 1
                # What the client waited for: the first token of any of its choices.
                waits = [w for m in gen.group if (w := m.time_to_first_token()) is not None]
                if waits:
                    self.ttft.observe(min(waits))

    def loop_idle(self, loop: ModelLoop) -> None:
        waiting, self._waiting = self._waiting, deque()
        for gen in waiting:
            self._place(gen)

    def loop_failed(self, loop: ModelLoop) -> None:
        self._cache.discard(loop.key)

    # ---- stats ----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        models = [loop.stats() for _, loop in self._cache.items()]
        return {
            "worker": self.name,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "device": str(self.device),
            **self.device_details,
            "cuda_graphs": self.cuda_graphs,
            "capacity": self.max_rows,
            "in_flight": sum(len(gen.group) for gen in self._inflight.values()),
            "active_rows": sum(m["active_rows"] for m in models),
            "queued": sum(m["queued"] for m in models) + len(self._waiting),
            "models": models,
            "requests_served": self.requests_served,
            "tokens_served": sum(m["tokens_served"] for m in models) + self._evicted_tokens,
            "time_to_first_token": self.ttft.snapshot(),
            "decode_tokens_per_second": self.decode_speed.snapshot(),
            "started": self._started,
            "updated": time.time(),
        }

    # ---- tasks ----------------------------------------------------------------------------

    async def _intake(self) -> None:
        while not self._closing:
            await self._slots.acquire()
            message = await self._retrying("take requests", self.layer.receive, self.channel)
            if self._closing:  # taken while shutting down: say so rather than drop it
                self._slots.release()
                await self._refuse(message, "the engine worker is stopping; try again")
                return
            gen = self._take(message)
            if gen is None:
                continue
            gen.slots = 1
            if len(gen.group) > self.max_rows:
                reason = (f"n={len(gen.group)} asks for more choices than this engine worker "
                          f"decodes together (at most {self.max_rows} rows)")  # fmt: skip
                for member in gen.group:
                    self.emit(member, error(member.request.id, reason))
                    self.finished(member, None)
                continue
            # The other choices' rows: wait for them here, taking nothing else meanwhile.
            while gen.slots < len(gen.group) and gen.request.id in self._inflight:
                await self._slots.acquire()
                if gen.request.id in self._inflight:
                    gen.slots += 1
                else:  # stopped while waiting
                    self._slots.release()
            if gen.request.id in self._inflight:
                self._place(gen)

    def _take(self, message: dict[str, Any]) -> Generation | None:
        try:
            request, reply_channel = GenerationRequest.from_message(message)
        except ProtocolError as exc:
            log.warning("ignoring a malformed request: %s", exc)
            self._slots.release()
            reply_channel, request_id = message.get("reply"), message.get("id")
            if isinstance(reply_channel, str) and isinstance(request_id, str):
                answer = error(request_id, f"malformed request: {exc}")
                self._outbox.put_nowait((reply_channel, answer, None))
            return None
        gen = Generation.for_request(request, reply_channel)
        self._inflight[request.id] = gen
        self.emit(gen, accepted(request.id, self.name, heartbeat=bool(self._redis_url)))
        return gen

    def _place(self, gen: Generation) -> None:
        loop = self._cache.get_or_create(gen.key, lambda: self._new_loop(gen.key))
        if loop is None:
            self._waiting.append(gen)
        else:
            loop.submit(gen)

    def _new_loop(self, key: ModelKey) -> ModelLoop:
        loop = ModelLoop(
            key, self, device=self.device, max_rows=self.max_rows,
            chunk_interval=self.chunk_interval, cuda_graphs=self.cuda_graphs,
        )  # fmt: skip
        loop.start()
        return loop

    def _evict(self, loop: ModelLoop) -> None:
        log.info("unloading %s step %s", loop.key.path, loop.key.step)
        self._evicted_tokens += loop.tokens_served
        loop.close()

    async def _control(self) -> None:
        while not self._closing:
            message = await self._retrying("take stops", self.layer.receive, self.name)
            if message.get("type") == STOP:
                self._stop(message.get("request"))

    def _stop(self, request_id: Any) -> None:
        gen = self._inflight.get(request_id) if isinstance(request_id, str) else None
        if gen is None:
            return  # already finished: nothing to stop
        if gen.loop is not None:
            gen.loop.stop(gen)
            return
        if gen in self._waiting:
            self._waiting.remove(gen)
        for member in gen.group:  # waiting for a model, or still for its rows
            member.stop_requested = True
            final = member.final("stopped")
            self.emit(member, final.as_message(member.request.id))
            self.finished(member, final)

    async def _send_loop(self) -> None:
        while (item := await self._outbox.get()) is not None:  # None: shutdown, all sent
            channel, message, request_id = item
            try:
                await self._retrying("send replies", self.layer.send, channel, message)
            except ChannelFull:
                # Nobody reads that channel any more (the front end is gone): stop generating.
                gen = self._inflight.get(request_id)
                if gen is not None and not gen.stop_requested:
                    log.warning("reply channel of request %s is full; stopping it", request_id)
                    self._stop(request_id)

    async def _retrying(self, what: str, call, *args) -> Any:
        """`await call(*args)`, waiting with backoff while Redis cannot be reached."""
        delay = RECONNECT_FIRST_SECONDS
        failing = False
        while True:
            try:
                result = await call(*args)
            except REDIS_DOWN as exc:
                if self._closing:
                    raise
                if not failing:
                    log.warning("cannot %s: Redis is unreachable (%s); retrying", what, exc)
                failing = True
                await asyncio.sleep(delay)
                delay = min(2 * delay, RECONNECT_MAX_SECONDS)
                continue
            if failing:
                log.info("can %s again: Redis answers", what)
            return result

    async def _tick(self, publisher: StatsPublisher | None) -> None:
        while not self._closing:
            now = time.monotonic()
            for gen in list(self._inflight.values()):
                if now - max(member.last_sent_at for member in gen.group) >= KEEPALIVE_SECONDS:
                    self.emit(gen, alive(gen.request.id))
            if publisher is not None:
                try:
                    await publisher.publish(self.stats())
                except Exception as exc:  # stats are best effort; serving goes on
                    log.warning("cannot publish engine stats: %s", exc)
            await asyncio.sleep(self.stats_interval)

    async def _shutdown(
        self, sender: asyncio.Task, listeners: list[asyncio.Task], publisher: StatsPublisher | None
    ) -> None:
        """Stop taking work, answer every reply in progress, then stop sending.

        Tasks are waited for with a time limit and also watch `_closing`: a cancellation that
        arrives inside redis-py can be swallowed (seen with redis-py 8 / channels_redis 4.3),
        and a shutdown must not hang on it.
        """
        self._closing = True
        for task in listeners:
            task.cancel()
        await asyncio.wait(listeners, timeout=SHUTDOWN_GRACE_SECONDS)
        for _, loop in self._cache.items():
            loop.close()
        for gen in list(self._inflight.values()):
            self.emit(gen, error(gen.request.id, "the engine worker stopped"))
        self._outbox.put_nowait(None)
        if not sender.done():
            await asyncio.wait([sender], timeout=SHUTDOWN_GRACE_SECONDS)
        if publisher is not None:
            try:
                await publisher.close()
            except Exception as exc:
                log.warning("cannot remove the engine stats key: %s", exc)
        log.info("engine worker %s stopped", self.name)

    async def _refuse(self, message: dict[str, Any], reason: str) -> None:
        reply_channel, request_id = message.get("reply"), message.get("id")
        if isinstance(reply_channel, str) and isinstance(request_id, str):
            with contextlib.suppress(Exception):  # best effort on the way out
                await self.layer.send(reply_channel, error(request_id, reason))


def device_details(device: torch.device) -> dict[str, Any]:
    """What the stats say about a worker's device beyond its name: on CUDA the GPU's model and
    the physical GPUs the process may see (CUDA_VISIBLE_DEVICES, which cuda:N indexes)."""
    if device.type != "cuda":
        return {}
    index = 0 if device.index is None else device.index
    return {
        "device_name": torch.cuda.get_device_name(index),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
