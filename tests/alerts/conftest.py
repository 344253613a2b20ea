"""Fixtures of the alerts tests: the runs tests' users and runs, a webhook receiver, and the
queue boundary.

The receiver is a real HTTP server on 127.0.0.1 in a thread, answering from a script of
status codes (500 then 200, say) and keeping every request it got. `queued` replaces only the
step that hands a delivery id to the broker, so a test makes each attempt itself with
alerts.delivery.attempt — the function the Celery task calls (tests/alerts/test_live.py runs
the real worker).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.runs.conftest import (  # noqa: F401 - fixtures
    alice,
    api,
    bob,
    make_dataset,
    make_run,
    make_tokenizer,
    ready_dataset,
    ready_tokenizer,
)


class WebhookReceiver:
    """An HTTP server that answers POSTs with the next scripted status (the last one repeats)."""

    def __init__(self, statuses=(200,), location: str = ""):
        self.statuses = list(statuses)
        self.location = location
        self.requests: list[dict] = []
        self.arrived = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                receiver.requests.append({
                    "path": self.path, "headers": dict(self.headers), "raw": raw,
                    "json": json.loads(raw or b"null"),
                })  # fmt: skip
                index = min(len(receiver.requests), len(receiver.statuses)) - 1
                status = receiver.statuses[index]
                body = b"ok" if status < 400 else b"receiver says no"
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("Location", receiver.location)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                if status < 300:
                    receiver.arrived.set()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_port
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    """receiver(statuses=(...)) -> a running WebhookReceiver, closed after the test."""
    made = []

    def make(statuses=(200,), location: str = "") -> WebhookReceiver:
        server = WebhookReceiver(statuses, location)
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()


@pytest.fixture
def local_webhooks(settings):
    """Webhooks may reach 127.0.0.1 (any port), as an admin would allow a LAN chat server."""
    settings.ALERT_WEBHOOK_ALLOWED_HOSTS = ["127.0.0.1"]
    settings.ALERT_RETRY_BASE_SECONDS = 30
    settings.ALERT_MAX_ATTEMPTS = 5
    settings.SITE_URL = "http://nanochat.test"


@pytest.fixture
def queued(monkeypatch):
    """The delivery ids handed to the broker, in order (none is actually sent)."""
    from alerts import tasks

    ids: list[int] = []
    monkeypatch.setattr(tasks, "enqueue", lambda delivery_id, countdown=0: ids.append(delivery_id))
    return ids
