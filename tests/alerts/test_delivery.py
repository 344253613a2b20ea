"""Sending: real HTTP to a local receiver, e-mail through Django's backends (locmem, and a
real SMTP conversation with a small server in a thread), retries with backoff, the address
policy at send time, and the one-attempt-per-claim rule.

Each attempt is made with alerts.delivery.attempt, the function the Celery task calls; a
retry is made due by moving its next_attempt_at to now (the task would wait for it).
"""

from __future__ import annotations

import socket
import socketserver
import threading
from datetime import timedelta

import pytest
from django.core import mail
from django.utils import timezone

from alerts import delivery, services, tasks
from alerts.models import AlertSettings, Delivery, Notification

pytestmark = pytest.mark.django_db


def notification(user, **fields) -> Notification:
    body = {"text": "Run 'x' (base #1) succeeded", "event": "run.succeeded",
            "run": {"id": 1, "name": "x", "status": "succeeded", "url": "http://s/runs/1/"}}  # fmt: skip
    return Notification.objects.create(user=user, event="run.succeeded", text=body["text"],
                                       payload=body, **fields)  # fmt: skip


def webhook_delivery(user, url: str) -> Delivery:
    return Delivery.objects.create(notification=notification(user), channel="webhook",
                                   target=url, next_attempt_at=timezone.now())  # fmt: skip


def make_due(item: Delivery) -> None:
    Delivery.objects.filter(pk=item.pk).update(next_attempt_at=timezone.now())


def test_a_webhook_answering_500_is_retried_and_then_delivered(alice, receiver, local_webhooks):
    server = receiver(statuses=(500, 200))
    item = webhook_delivery(alice, server.url)

    assert delivery.attempt(item.pk) == 30  # the base delay: ALERT_RETRY_BASE_SECONDS
    item.refresh_from_db()
    assert item.status == "pending" and item.attempts == 1
    assert item.last_error == "HTTP 500: receiver says no"
    assert item.next_attempt_at > timezone.now() + timedelta(seconds=25)
    assert delivery.attempt(item.pk) is None  # not due yet: no attempt
    assert len(server.requests) == 1

    make_due(item)
    assert delivery.attempt(item.pk) is None
    item.refresh_from_db()
    assert item.status == "sent" and item.attempts == 2 and item.sent_at is not None
    assert [h["ok"] for h in item.history] == [False, True]
    assert item.history[1]["detail"] == "HTTP 200"
    assert len(server.requests) == 2
    first, second = server.requests
    assert first["raw"] == second["raw"]  # the same body each time
    assert second["path"] == "/hook" and second["headers"]["Content-Type"] == "application/json"
    assert second["json"]["event"] == "run.succeeded" and second["json"]["run"]["id"] == 1
    assert delivery.attempt(item.pk) is None  # sent: never again


def test_backoff_doubles_and_gives_up_after_the_last_attempt(alice, settings, local_webhooks):
    settings.ALERT_MAX_ATTEMPTS = 3
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    item = webhook_delivery(alice, f"http://127.0.0.1:{port}/hook")
    delays = []
    for _ in range(3):
        make_due(item)
        delays.append(delivery.attempt(item.pk))
    item.refresh_from_db()
    assert delays == [30, 60, None]
    assert item.status == "failed" and item.attempts == 3 and item.next_attempt_at is None
    assert item.last_error.startswith("could not connect")
    assert all(not h["ok"] for h in item.history)


@pytest.mark.parametrize(("status", "error"), [(404, "HTTP 404"), (302, "HTTP 302")])
def test_answers_no_retry_can_change_fail_at_once(alice, receiver, local_webhooks, status, error):
    server = receiver(statuses=(status,), location="http://127.0.0.1:9/elsewhere")
    item = webhook_delivery(alice, server.url)
    assert delivery.attempt(item.pk) is None
    item.refresh_from_db()
    assert item.status == "failed" and item.attempts == 1 and item.last_error.startswith(error)
    assert len(server.requests) == 1  # the redirect was not followed


def test_429_is_retried(alice, receiver, local_webhooks):
    item = webhook_delivery(alice, receiver(statuses=(429, 200)).url)
    assert delivery.attempt(item.pk) == 30


def test_a_private_address_is_refused_at_send_time(alice, receiver, settings):
    """Saved while allowed, refused once the admin removed the host: nothing is sent."""
    settings.ALERT_WEBHOOK_ALLOWED_HOSTS = []
    server = receiver()
    item = webhook_delivery(alice, server.url)
    assert delivery.attempt(item.pk) is None
    item.refresh_from_db()
    assert item.status == "failed" and "loopback" in item.last_error
    assert "ALERT_WEBHOOK_ALLOWED_HOSTS" in item.last_error
    assert server.requests == []


def test_one_claim_one_attempt(alice, receiver, local_webhooks):
    """Two messages for one due delivery (the beat's resend and a late original): the second
    finds it claimed and sends nothing."""
    server = receiver(statuses=(500,))
    item = webhook_delivery(alice, server.url)
    assert delivery.attempt(item.pk) == 30
    assert delivery.attempt(item.pk) is None
    assert len(server.requests) == 1
    assert delivery.attempt(987654) is None  # gone


def test_overdue_deliveries_are_sent_again_by_the_beat(alice, local_webhooks, queued):
    late = webhook_delivery(alice, "http://127.0.0.1:9/")
    Delivery.objects.filter(pk=late.pk).update(next_attempt_at=timezone.now() - timedelta(hours=1))
    webhook_delivery(alice, "http://127.0.0.1:9/")  # due now: its message is on its way
    sent = webhook_delivery(alice, "http://127.0.0.1:9/")
    Delivery.objects.filter(pk=sent.pk).update(
        status="sent", next_attempt_at=timezone.now() - timedelta(hours=1)
    )
    assert tasks.resend_due() == [late.pk] and queued == [late.pk]


# ---- e-mail ---------------------------------------------------------------------------------


def test_email_goes_through_djangos_mail_settings(alice, settings, local_webhooks):
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    settings.DEFAULT_FROM_EMAIL = "alerts@nanochat.test"
    made = notification(alice)
    made.payload["run"].update(duration_seconds=130.0, best_val_bpb=1.25,
                               metrics={"val/bpb": 1.25})  # fmt: skip
    made.save()
    item = Delivery.objects.create(notification=made, channel="email", target="a@example.com",
                                   next_attempt_at=timezone.now())  # fmt: skip
    assert delivery.attempt(item.pk) is None
    item.refresh_from_db()
    assert item.status == "sent" and item.history[0]["detail"] == "mailed to a@example.com"
    (message,) = mail.outbox
    assert message.to == ["a@example.com"] and message.from_email == "alerts@nanochat.test"
    assert message.subject == "[nanochat] Run 'x' (base #1) succeeded"
    for line in ("Status: succeeded", "Duration: 2m 10s", "Best val bpb: 1.25",
                 "val/bpb: 1.25", "Link: http://s/runs/1/",
                 "Change your alerts at http://nanochat.test/alerts/"):  # fmt: skip
        assert line in message.body, line


class SMTPHandler(socketserver.StreamRequestHandler):
    """Just enough SMTP for smtplib: greet, EHLO, MAIL, RCPT, DATA, QUIT."""

    def reply(self, line: str) -> None:
        self.wfile.write(line.encode() + b"\r\n")

    def handle(self) -> None:
        self.reply("220 test smtp")
        envelope = {"to": []}
        while line := self.rfile.readline():
            command = line.decode().strip()
            verb = command[:4].upper()
            if verb in ("EHLO", "HELO"):
                self.reply("250 test")
            elif verb == "MAIL":
                envelope["from"] = command
                self.reply("250 ok")
            elif verb == "RCPT":
                refused = self.server.refuse and self.server.refuse in command
                envelope["to"].append(command)
                self.reply("550 no such user" if refused else "250 ok")
            elif verb == "DATA":
                self.reply("354 go on")
                data = b""
                while (chunk := self.rfile.readline()) not in (b".\r\n", b""):
                    data += chunk
                self.server.received.append({**envelope, "data": data.decode()})
                self.reply("250 queued")
            elif verb == "QUIT":
                self.reply("221 bye")
                return
            else:
                self.reply("250 ok")


@pytest.fixture
def smtp_server():
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), SMTPHandler)
    server.daemon_threads = True
    server.received, server.refuse = [], ""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_email_through_a_real_smtp_server(alice, settings, smtp_server, local_webhooks):
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT = "127.0.0.1", smtp_server.server_address[1]
    item = Delivery.objects.create(notification=notification(alice), channel="email",
                                   target="a@example.com", next_attempt_at=timezone.now())  # fmt: skip
    assert delivery.attempt(item.pk) is None
    item.refresh_from_db()
    assert item.status == "sent"
    (got,) = smtp_server.received
    assert "a@example.com" in got["to"][0]
    assert "Subject: [nanochat] Run 'x' (base #1) succeeded" in got["data"]

    smtp_server.refuse = "b@example.com"
    refused = Delivery.objects.create(notification=notification(alice), channel="email",
                                      target="b@example.com", next_attempt_at=timezone.now())  # fmt: skip
    assert delivery.attempt(refused.pk) is None  # a refused address: no retry
    refused.refresh_from_db()
    assert refused.status == "failed" and "refused" in refused.last_error


def test_a_mail_server_that_is_down_is_retried(alice, settings, local_webhooks):
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        settings.EMAIL_HOST, settings.EMAIL_PORT = "127.0.0.1", probe.getsockname()[1]
    item = Delivery.objects.create(notification=notification(alice), channel="email",
                                   target="a@example.com", next_attempt_at=timezone.now())  # fmt: skip
    assert delivery.attempt(item.pk) == 30
    item.refresh_from_db()
    assert item.status == "pending" and "ConnectionRefusedError" in item.last_error


# ---- test notifications and the admin's resend ------------------------------------------------


def test_a_test_notification_goes_to_every_enabled_channel(
    alice, receiver, settings, local_webhooks, monkeypatch, django_capture_on_commit_callbacks
):
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    server = receiver()
    AlertSettings.objects.create(user=alice, webhook_enabled=True, webhook_url=server.url,
                                 email_enabled=True, email="me@example.com")  # fmt: skip
    sent: list[int] = []
    # The broker boundary: attempt at once, as the worker would.
    monkeypatch.setattr(
        tasks, "enqueue", lambda pk, countdown=0: sent.append(delivery.attempt(pk) or pk)
    )
    with django_capture_on_commit_callbacks(execute=True):
        made = services.send_test(alice)
    assert len(sent) == 2
    assert {d.status for d in made.deliveries.all()} == {"sent"}
    assert server.requests[0]["json"]["event"] == "test"
    assert "nanochat alerts reach this channel" in server.requests[0]["json"]["text"]
    assert mail.outbox[0].to == ["me@example.com"]
    with pytest.raises(services.TooSoon):
        services.send_test(alice)


def test_the_admin_resends_failed_deliveries_only(alice, local_webhooks, queued):
    failed = webhook_delivery(alice, "http://127.0.0.1:9/")
    Delivery.objects.filter(pk=failed.pk).update(status="failed", attempts=5)
    pending = webhook_delivery(alice, "http://127.0.0.1:9/")
    assert services.resend([failed.pk, pending.pk]) == 1
    failed.refresh_from_db()
    assert failed.status == "pending" and failed.attempts == 0
