"""Websocket routes of the whole site; each app contributes its own list."""

from django.urls import path

from arena.routing import websocket_urlpatterns as arena_routes
from chat.routing import websocket_urlpatterns as chat_routes
from nanochat_site.consumers import HealthConsumer
from runs.routing import websocket_urlpatterns as runs_routes

websocket_urlpatterns = [
    path("ws/health/", HealthConsumer.as_asgi()),
    *runs_routes,
    *chat_routes,
    *arena_routes,
]
