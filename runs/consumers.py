"""Websockets of the run pages: one run's live updates, or every run's status changes."""

from __future__ import annotations

from channels.generic.websocket import AsyncJsonWebsocketConsumer

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

    async def receive_json(self, content, **kwargs):
        if isinstance(content, dict) and content.get("type") == "ping":
            await self.send_json({"type": "pong"})

    async def run_update(self, event):
        await self.send_json({k: v for k, v in event.items() if k != "type"} | {"type": "run"})
