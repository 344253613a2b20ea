"""Websocket routes of the runs app (included by nanochat_site/routing.py)."""

from django.urls import path

from runs.consumers import RunUpdatesConsumer

websocket_urlpatterns = [
    path("ws/runs/", RunUpdatesConsumer.as_asgi()),
    path("ws/runs/<int:run_id>/", RunUpdatesConsumer.as_asgi()),
]
