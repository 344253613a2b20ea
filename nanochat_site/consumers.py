"""The health websocket: a round trip through the channel layer, for the live status badge."""

import time

from channels.generic.websocket import AsyncJsonWebsocketConsumer


class HealthConsumer(AsyncJsonWebsocketConsumer):
    """Echo a ping back *through the channel layer* (Redis), not straight from memory.

    The browser uses it to show whether live updates work; tests use it to prove the layer
    carries messages between processes.
    """

    async def connect(self):
        if not self.scope["user"].is_authenticated:
            await self.close(code=4401)
            return
        await self.accept()

    async def receive_json(self, content, **kwargs):
        if not isinstance(content, dict) or content.get("type") != "ping":
            await self.send_json({"type": "error", "error": 'expected {"type": "ping"}'})
            return
        await self.channel_layer.send(
            self.channel_name,
            {"type": "health.pong", "id": content.get("id"), "sent": time.time()},
        )

    async def health_pong(self, event):
        await self.send_json(
            {
                "type": "pong",
                "id": event["id"],
                "layer_ms": round((time.time() - event["sent"]) * 1000, 2),
            }
        )
