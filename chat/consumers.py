"""The chat websocket (`/ws/chat/`): validates what the browser sends, streams the reply back.

Client frames:
    {"type": "send", "conversation": id|null, "checkpoint": id, "content": str,
     "run": id,                 (instead of checkpoint: follow the run -- its newest checkpoint
                                 when the frame arrives answers; in every reply frame too)
     "temperature": 0.8, "top_k": 50, "max_tokens": 512,     (sampling fields optional)
     "mode": "chat"|"completion", "system": str}  (optional: a new conversation's mode; the
                                                   system prompt, stored on the conversation)
    {"type": "regenerate", "conversation": id, "checkpoint": id?, ...sampling, "system"?}
    {"type": "edit", "conversation": id, "message": id, "content": str, "checkpoint": id?, ...}
    {"type": "stop"}
Server frames:
    {"type": "started", "conversation": id, "message": id, "context_start": id|null,
     "max_tokens": n, "checkpoint": id, "step": n}
                            the user message answered; the first message the model sees when
                            older ones were left out to fit its context; max_tokens as capped;
                            the checkpoint (and its step) that answers
    {"type": "token", "text": str, "part": "text"|"python"|"python_output"}   as generated
    {"type": "done", "conversation": id, "message": id, "content", "parts", "finish_reason",
     "prompt_tokens", "completion_tokens", "time_to_first_token", "tokens_per_second",
     "batch_rows", "context_start", "checkpoint", "step"}
    {"type": "error", "field": name|null, "message": str}       the socket stays usable

One reply at a time per socket. The consumer only validates, calls chat/services.py and relays
a `Reply` (chat/protocol.py); the model runs in an engine worker. Closing the socket stops the
reply; the partial text is saved like a stopped one.
"""

from __future__ import annotations

import asyncio
import logging
import secrets

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from chat import limits, services
from chat.limits import FieldError, Sampling
from chat.protocol import Chunk, EngineError, Reply
from chat.services import PendingReply
from nanochat_site.limits import InputError, parse_json

log = logging.getLogger("chat")

# After the socket closes, how long the stopped reply may take to come back and be saved
# (daphne gives a closing consumer 10 s before it kills it).
STOP_GRACE_SECONDS = 8.0
FRAME_TYPES = ("send", "regenerate", "edit", "stop")


class ChatConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self):
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=4401)
            return
        self.user = user
        self.limits = services.chat_limits()
        self.reply: Reply | None = None
        self.generation: asyncio.Task | None = None
        self.closed = False
        await self.accept()

    async def disconnect(self, code):
        self.closed = True
        task = getattr(self, "generation", None)
        if task is None or task.done():
            return
        if self.reply is not None:
            await self.reply.stop()
        await asyncio.wait([task], timeout=STOP_GRACE_SECONDS)
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def receive(self, text_data=None, bytes_data=None, **kwargs):
        try:
            frame = parse_json(text_data if text_data is not None else bytes_data, what="frame")
        except InputError as exc:  # malformed, too big or too deep: said, and the socket stays
            await self._error(None, str(exc))
            return
        await self.receive_json(frame)

    async def receive_json(self, content, **kwargs):
        if not isinstance(content, dict):
            await self._error(None, "each frame must be a JSON object")
            return
        kind = content.get("type")
        if kind not in FRAME_TYPES:
            await self._error("type", f"type must be one of {', '.join(FRAME_TYPES)}")
            return
        try:
            await getattr(self, f"_on_{kind}")(content)
        except FieldError as exc:
            await self._error(exc.field, exc.message)

    # ---- frames -------------------------------------------------------------------------

    async def _on_send(self, frame: dict) -> None:
        self._check_idle()
        conversation = limits.object_id(frame, "conversation", required=False)
        # Following a run ("run", read with the settings) stands for choosing a checkpoint.
        checkpoint = limits.object_id(frame, "checkpoint", required=frame.get("run") is None)
        content = limits.content(frame, self.limits)
        sampling = limits.sampling(frame, self.limits)
        pending = await database_sync_to_async(services.begin_send)(
            self.user, conversation, checkpoint, content, self.limits, sampling,
            **self._conversation_settings(frame),
        )  # fmt: skip
        await self._start(pending, sampling)

    async def _on_regenerate(self, frame: dict) -> None:
        self._check_idle()
        conversation = limits.object_id(frame, "conversation", required=True)
        checkpoint = limits.object_id(frame, "checkpoint", required=False)
        sampling = limits.sampling(frame, self.limits)
        pending = await database_sync_to_async(services.begin_regenerate)(
            self.user, conversation, checkpoint, sampling, **self._conversation_settings(frame)
        )
        await self._start(pending, sampling)

    async def _on_edit(self, frame: dict) -> None:
        self._check_idle()
        conversation = limits.object_id(frame, "conversation", required=True)
        message = limits.object_id(frame, "message", required=True)
        checkpoint = limits.object_id(frame, "checkpoint", required=False)
        content = limits.content(frame, self.limits)
        sampling = limits.sampling(frame, self.limits)
        pending = await database_sync_to_async(services.begin_edit)(
            self.user, conversation, message, content, checkpoint, self.limits, sampling,
            **self._conversation_settings(frame),
        )  # fmt: skip
        await self._start(pending, sampling)

    async def _on_stop(self, frame: dict) -> None:
        if self.reply is not None:
            await self.reply.stop()

    def _conversation_settings(self, frame: dict) -> dict:
        return {
            "mode": limits.mode(frame),
            "system": limits.system_prompt(frame, self.limits),
            "run_id": limits.object_id(frame, "run", required=False),
        }

    # ---- the reply ----------------------------------------------------------------------

    def _check_idle(self) -> None:
        if self.generation is not None and not self.generation.done():
            raise FieldError("type", "a reply is still being generated: stop it first")

    async def _start(self, pending: PendingReply, sampling: Sampling) -> None:
        seed = secrets.randbelow(2**31)  # a fresh one per reply (SPEC §12)
        sampling = pending.fitted(sampling)
        self.reply = Reply(pending.request(sampling, seed), layer=self.channel_layer)
        await self._frame(
            {
                "type": "started",
                "conversation": pending.conversation_id,
                "message": pending.anchor_id,
                "context_start": pending.context_start_id,
                "max_tokens": sampling.max_tokens,
                "checkpoint": pending.checkpoint_id,
                "step": pending.step,
            }
        )
        used = {**sampling.as_dict(), "seed": seed}
        self.generation = asyncio.create_task(self._generate(pending, self.reply, used))

    async def _generate(self, pending: PendingReply, reply: Reply, sampling: dict) -> None:
        final = None
        try:
            async with reply:
                async for event in reply:
                    if isinstance(event, Chunk):
                        for part, text in event.pieces:
                            await self._frame({"type": "token", "text": text, "part": part})
                    else:
                        final = event
            message = await database_sync_to_async(services.finish_reply)(pending, final, sampling)
        except EngineError as exc:
            await database_sync_to_async(services.abandon_reply)(pending)
            await self._error(None, str(exc))
            return
        except FieldError as exc:
            await self._error(exc.field, exc.message)
            return
        except asyncio.CancelledError:
            await database_sync_to_async(services.abandon_reply)(pending)
            raise
        except Exception:
            log.exception("reply to message %s failed", pending.anchor_id)
            await self._error(None, "the reply failed; see the server log")
            return
        finally:
            self.reply = None
        await self._frame(
            {
                "type": "done",
                "conversation": pending.conversation_id,
                "message": message.pk,
                "content": final.content,
                "parts": final.parts,
                "context_start": message.context_start_id,
                "checkpoint": message.checkpoint_id,
                "step": message.checkpoint_step,
                **final.stats(),
            }
        )

    async def _frame(self, payload: dict) -> None:
        if not self.closed:
            await self.send_json(payload)

    async def _error(self, field: str | None, message: str) -> None:
        await self._frame({"type": "error", "field": field, "message": message})
