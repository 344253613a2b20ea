"""Websocket routes of the whole site; each app contributes its own list."""

from django.urls import path

from nanochat_site.consumers import HealthConsumer

websocket_urlpatterns = [
    path("ws/health/", HealthConsumer.as_asgi()),
]
