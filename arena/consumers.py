"""The arena websocket (`/ws/arena/`): one prompt, two blind replies streamed side by side.

Client frames:
    {"type": "battle", "content": str, "checkpoints": [id|null, id|null] (optional: drawn
     when absent or null), "temperature", "top_k", "max_tokens" (optional, the chat's bounds)}
    {"type": "stop"}              ends both replies early (the battle is then discarded)
Server frames:
    {"type": "started", "battle": id, "max_tokens": {"a": n, "b": n}}
    {"type": "token", "side": "a"|"b", "text": str, "part": "text"|"python"|"python_output"}
    {"type": "ready", "battle": id, "a": {stats}, "b": {stats}}   both replies saved: vote
                                  with POST /api/arena/battles/<id>/vote/ (the names come back)
    {"type": "error", "field": name|null, "message": str}         the socket stays usable

No frame names a side's checkpoint: the names are revealed only by the vote. One battle at a
time per socket; closing the socket stops both replies and discards the battle.
"""

from __future__ import annotations

import asyncio
import logging

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from arena import services
from chat import limits
from chat.limits import FieldError
from chat.protocol import Chunk, EngineError
from chat.services import chat_limits
from nanochat_site.limits import InputError, parse_json

log = logging.getLogger("arena")
FRAME_TYPES = ("battle", "stop")


class ArenaConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self):
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=4401)
            return
        self.user = user
        self.limits = chat_limits()
        self.generation: asyncio.Task | None = None
        self.closed = False
        await self.accept()

    async def disconnect(self, code):
        self.closed = True
        task = getattr(self, "generation", None)
        if task is not None and not task.done():
            task.cancel()  # leaving both Replies stops their generations on the workers
            await asyncio.gather(task, return_exceptions=True)

    async def receive(self, text_data=None, bytes_data=None, **kwargs):
        try:
            frame = parse_json(text_data if text_data is not None else bytes_data, what="frame")
        except InputError as exc:
            await self._error(None, str(exc))
            return
        if not isinstance(frame, dict) or frame.get("type") not in FRAME_TYPES:
            await self._error("type", f"type must be one of {', '.join(FRAME_TYPES)}")
            return
        try:
            if frame["type"] == "stop":
                await self._stop()
            else:
                await self._battle(frame)
        except FieldError as exc:
            await self._error(exc.field, exc.message)

    async def _battle(self, frame: dict) -> None:
        if self.generation is not None and not self.generation.done():
            raise FieldError("type", "a battle is still being generated: stop it first")
        content = limits.content(frame, self.limits)
        sampling = limits.sampling(frame, self.limits)
        chosen = checkpoint_choice(frame)
        pending = await database_sync_to_async(services.begin_battle)(
            self.user, content, chosen, sampling
        )
        await self._frame(
            {"type": "started", "battle": pending.battle_id, "max_tokens": pending.max_tokens}
        )
        self.generation = asyncio.create_task(self._generate(pending))

    async def _stop(self) -> None:
        if self.generation is not None and not self.generation.done():
            self.generation.cancel()
            await asyncio.gather(self.generation, return_exceptions=True)
            await self._error(None, "stopped: the battle was discarded")

    async def _generate(self, pending: services.PendingBattle) -> None:
        async def forward(side: str, chunk: Chunk) -> None:
            for part, text in chunk.pieces:
                await self._frame({"type": "token", "side": side, "text": text, "part": part})

        try:
            finals = await services.generate(pending, forward, layer=self.channel_layer)
            await database_sync_to_async(services.finish_battle)(pending, finals)
        except EngineError as exc:
            await database_sync_to_async(services.abandon_battle)(pending)
            await self._error(None, str(exc))
            return
        except asyncio.CancelledError:
            await database_sync_to_async(services.abandon_battle)(pending)
            raise
        except Exception:
            log.exception("battle %s failed", pending.battle_id)
            await database_sync_to_async(services.abandon_battle)(pending)
            await self._error(None, "the battle failed; see the server log")
            return
        frame = {"type": "ready", "battle": pending.battle_id}
        await self._frame(frame | {side: final.stats() for side, final in finals.items()})

    async def _frame(self, payload: dict) -> None:
        if not self.closed:
            await self.send_json(payload)

    async def _error(self, field: str | None, message: str) -> None:
        await self._frame({"type": "error", "field": field, "message": message})


def checkpoint_choice(frame: dict) -> list[int | None]:
    """The checkpoints a frame (or a request body) asks for: up to two ids, null for "draw"."""
    value = frame.get("checkpoints")
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > 2:
        raise FieldError("checkpoints", "checkpoints must be a list of at most two ids")
    return [limits.object_id({"checkpoints": v}, "checkpoints", required=False) for v in value]
