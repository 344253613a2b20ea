"""Sending one delivery once: claim it, send it, record the attempt, say when to try again.

Called by the Celery task (alerts/tasks.py) and, in tests, directly. Every attempt is written
to the delivery's history whatever happens; nothing here raises for a failed send.

An attempt first claims the delivery by moving its `next_attempt_at` past the attempt's
longest possible duration, in one conditional UPDATE: a message sent twice (the beat's resend
and a late original) makes one attempt, not two.
"""

from __future__ import annotations

import logging
import smtplib
from datetime import timedelta

from django.conf import settings
from django.core.mail import BadHeaderError, send_mail
from django.utils import timezone

from alerts import rules, webhooks
from alerts.models import Delivery

log = logging.getLogger(__name__)
CLAIM_SECONDS = 180  # longer than one attempt may take (the task's time limit)
EARLY_SECONDS = 1.0  # a retry message may arrive this much before its time (clock skew)
OVERDUE_SECONDS = 120  # a due delivery this late had its message lost
DETAIL_CHARS = 500
HISTORY_LIMIT = 20  # attempts kept per delivery (an admin's "send again" adds more)
SUBJECT_CHARS = 150
# SMTP answers no retry can change: the server refused the address or the sender.
PERMANENT_MAIL_ERRORS = (smtplib.SMTPRecipientsRefused, smtplib.SMTPSenderRefused, BadHeaderError)


def attempt(delivery_id: int) -> float | None:
    """Make one attempt if the delivery is due; seconds until the next one, or None when
    there is none to make (sent, given up, not due, or gone)."""
    now = timezone.now()
    claimed = Delivery.objects.filter(
        pk=delivery_id,
        status=Delivery.Status.PENDING,
        next_attempt_at__lte=now + timedelta(seconds=EARLY_SECONDS),
    ).update(next_attempt_at=now + timedelta(seconds=CLAIM_SECONDS))
    if not claimed:
        return None
    item = Delivery.objects.select_related("notification").get(pk=delivery_id)
    try:
        detail = send(item)
        ok, retry = True, False
    except webhooks.DeliveryError as exc:
        ok, retry, detail = False, exc.retry, str(exc)
    except Exception as exc:  # noqa: BLE001 - a bug or a strange answer: record it, try later
        log.warning("alert delivery %s: %s failed", delivery_id, item.channel, exc_info=True)
        ok, retry, detail = False, True, f"{type(exc).__name__}: {exc}"
    return _record(item, ok, retry, detail[:DETAIL_CHARS])


def _record(item: Delivery, ok: bool, retry: bool, detail: str) -> float | None:
    now = timezone.now()
    item.attempts += 1
    item.history = [*item.history, {"at": now.isoformat(), "ok": ok, "detail": detail}]
    item.history = item.history[-HISTORY_LIMIT:]
    delay = None
    if ok:
        item.status, item.sent_at, item.next_attempt_at = Delivery.Status.SENT, now, None
    elif retry and item.attempts < settings.ALERT_MAX_ATTEMPTS:
        delay = rules.retry_delay(item.attempts, settings.ALERT_RETRY_BASE_SECONDS)
        item.last_error = detail
        item.next_attempt_at = now + timedelta(seconds=delay)
    else:
        item.status, item.last_error, item.next_attempt_at = Delivery.Status.FAILED, detail, None
    item.save(update_fields=["attempts", "history", "status", "sent_at", "last_error",
                             "next_attempt_at", "updated"])  # fmt: skip
    outcome = "sent" if ok else f"failed ({detail})"
    log.info("alert delivery %s (%s, attempt %s): %s", item.pk, item.channel, item.attempts,
             outcome)  # fmt: skip
    return delay


def send(item: Delivery) -> str:
    """Send over the delivery's channel; a one-line outcome, or webhooks.DeliveryError."""
    notification = item.notification
    if item.channel == Delivery.Channel.WEBHOOK:
        return webhooks.post_json(
            item.target, notification.payload, settings.ALERT_WEBHOOK_TIMEOUT,
            settings.ALERT_WEBHOOK_ALLOWED_HOSTS,
        )  # fmt: skip
    return send_email(item.target, notification.text, notification.payload)


def send_email(address: str, text: str, payload: dict) -> str:
    subject = "[nanochat] " + rules.one_line(text.split(" · ")[0], SUBJECT_CHARS)
    body = mail_body(text, payload)
    try:
        send_mail(subject, body, settings.DEFAULT_FROM_EMAIL, [address], fail_silently=False)
    except PERMANENT_MAIL_ERRORS as exc:
        raise webhooks.DeliveryError(f"refused: {exc}", retry=False) from None
    except (smtplib.SMTPException, OSError) as exc:
        raise webhooks.DeliveryError(f"{type(exc).__name__}: {exc}", retry=True) from None
    return f"mailed to {address}"


def mail_body(text: str, payload: dict) -> str:
    """The e-mail: the summary, then the facts one per line, then where to change alerts."""
    lines = [text, ""]
    run = payload.get("run") or {}
    for label, key in (("Run", "name"), ("Kind", "kind"), ("Status", "status"),
                       ("Best val bpb", "best_val_bpb"), ("Error", "error"), ("Link", "url")):  # fmt: skip
        value = run.get(key)
        if value not in (None, ""):
            lines.append(f"{label}: {value}")
    if run.get("duration_seconds") is not None:
        lines.append(f"Duration: {rules.duration(run['duration_seconds'])}")
    for name, value in (run.get("metrics") or {}).items():
        lines.append(f"{name}: {rules.number(value)}")
    lines += ["", f"Change your alerts at {settings.SITE_URL}/alerts/"]
    return "\n".join(lines) + "\n"


def overdue_ids(limit: int = 500) -> list[int]:
    """Pending deliveries whose next attempt is long overdue: their message was lost."""
    cutoff = timezone.now() - timedelta(seconds=OVERDUE_SECONDS)
    due = Delivery.objects.filter(status=Delivery.Status.PENDING, next_attempt_at__lt=cutoff)
    return list(due.order_by("next_attempt_at").values_list("pk", flat=True)[:limit])
