"""Websockets of the run pages: one run's live updates, or every run's status changes."""

from __future__ import annotations

from channels.generic.websocket import AsyncJsonWebsocketConsumer

from nanochat_site.limits import InputError, parse_json
from runs import broadcast


class RunUpdatesConsumer(AsyncJsonWebsocketConsumer):
    """`/ws/runs/<id>/` streams one run's new metric points and events; `/ws/runs/` all runs'
    status. Signed-in users only (everyone may watch every run, as on the pages)."""

    async def connect(self):
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=4401)
            return
        run_id = self.scope["url_route"]["kwargs"].get("run_id")
        self.group = broadcast.group_for(run_id) if run_id is not None else broadcast.ALL_RUNS
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()

    async def disconnect(self, code):
        if hasattr(self, "group"):
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive(self, text_data=None, bytes_data=None, **kwargs):
        """Clients only ping (`{"type": "ping"}` -> `{"type": "pong"}`); anything else is
        answered with an error frame and the socket stays open."""
        try:
            frame = parse_json(text_data if text_data is not None else bytes_data, what="frame")
        except InputError as exc:
            await self._error(str(exc))
            return
        if isinstance(frame, dict) and frame.get("type") == "ping":
            await self.send_json({"type": "pong"})
        else:
            await self._error('this socket only takes {"type": "ping"} frames')

    async def _error(self, message: str) -> None:
        await self.send_json({"type": "error", "field": None, "message": message})

    async def run_update(self, event):
        await self.send_json({k: v for k, v in event.items() if k != "type"} | {"type": "run"})
