"""Websocket routes of the whole site; each app contributes its own list."""

from django.urls import path

from nanochat_site.consumers import HealthConsumer
from runs.routing import websocket_urlpatterns as runs_routes

websocket_urlpatterns = [
    path("ws/health/", HealthConsumer.as_asgi()),
    *runs_routes,
]
