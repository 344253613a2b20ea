"""What a user asked to be told, and what was told: settings, threshold rules, notifications
(one per thing that happened) and their deliveries (one per channel, with every attempt).

A Notification's `key` is unique: "the run ended" is recorded once per launch of a run and a
rule's crossing once per run, so a later point past the same threshold, a second follower or
a reconciler racing the worker cannot notify twice.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone

URL_MAX_LENGTH = 2000
METRIC_MAX_LENGTH = 64  # MetricPoint.name
TAG_MAX_LENGTH = 40  # runs.Tag.name


class AlertSettings(models.Model):
    """One user's channels and which run endings they want to hear about."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="alert_settings"
    )
    webhook_enabled = models.BooleanField(default=False)
    webhook_url = models.CharField(max_length=URL_MAX_LENGTH, blank=True)
    email_enabled = models.BooleanField(default=False)
    # Blank: the account's own address.
    email = models.EmailField(blank=True)
    on_succeeded = models.BooleanField(default=True)
    on_failed = models.BooleanField(default=True)
    on_cancelled = models.BooleanField(default=False)
    # The stages of a pipeline are runs too; by default only the pipeline's own end notifies.
    include_stages = models.BooleanField(default=False)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "alert settings"
        verbose_name_plural = "alert settings"

    def __str__(self) -> str:
        return f"alert settings of {self.user}"

    @property
    def email_to(self) -> str:
        """Where e-mail goes: the address given here, else the account's."""
        return self.email or self.user.email


class AlertRule(models.Model):
    """Notify when `metric` of one of the user's runs goes below/above `value` (first time)."""

    class Comparison(models.TextChoices):
        BELOW = "below"
        ABOVE = "above"

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="alert_rules"
    )
    metric = models.CharField(max_length=METRIC_MAX_LENGTH)
    comparison = models.CharField(max_length=8, choices=Comparison.choices)
    value = models.FloatField()
    # Blank: every run of the user; else only runs carrying this tag (runs/tags.py).
    tag = models.CharField(max_length=TAG_MAX_LENGTH, blank=True)
    enabled = models.BooleanField(default=True)
    created = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["created", "id"]
        indexes = [models.Index(fields=["user", "metric"], name="alert_rule_user_metric")]

    def __str__(self) -> str:
        tag = f" (tag {self.tag})" if self.tag else ""
        return f"{self.metric} {self.comparison} {self.shown_value}{tag}"

    @property
    def shown_value(self) -> str:
        """The value as typed (1.25, not 1.250000; 1e-06, not 0.000001000)."""
        return f"{self.value:.12g}"


class Notification(models.Model):
    """One thing the user is told about, on every channel they had enabled at the time."""

    class Event(models.TextChoices):
        SUCCEEDED = "run.succeeded", "run succeeded"
        FAILED = "run.failed", "run failed"
        CANCELLED = "run.cancelled", "run cancelled"
        THRESHOLD = "metric.threshold", "metric crossed a threshold"
        TEST = "test", "test notification"

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="alert_notifications"
    )
    event = models.CharField(max_length=32, choices=Event.choices)
    run = models.ForeignKey(
        "runs.Run", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    rule = models.ForeignKey(
        AlertRule, null=True, blank=True, on_delete=models.SET_NULL, related_name="notifications"
    )
    # "end:<run>:<launch>" or "rule:<rule>:run:<run>"; null for test notifications.
    key = models.CharField(max_length=100, null=True, blank=True, unique=True)
    text = models.TextField()  # the one-line summary (the webhook's `text`, the mail's body)
    payload = models.JSONField(default=dict)  # the webhook's JSON body, as sent
    created = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ["-created", "-id"]

    def __str__(self) -> str:
        return f"{self.get_event_display()} #{self.pk}"


class Delivery(models.Model):
    """Sending one notification over one channel: its attempts, its outcome."""

    class Channel(models.TextChoices):
        WEBHOOK = "webhook"
        EMAIL = "email", "e-mail"

    class Status(models.TextChoices):
        PENDING = "pending"  # not sent yet; tried (again) at next_attempt_at
        SENT = "sent"
        FAILED = "failed"  # given up: out of attempts, or an answer no retry can change

    notification = models.ForeignKey(
        Notification, on_delete=models.CASCADE, related_name="deliveries"
    )
    channel = models.CharField(max_length=8, choices=Channel.choices)
    target = models.CharField(max_length=URL_MAX_LENGTH)  # the URL or address, as it was
    status = models.CharField(
        max_length=8, choices=Status.choices, default=Status.PENDING, db_index=True
    )
    attempts = models.PositiveSmallIntegerField(default=0)
    # One entry per attempt: {"at": iso time, "ok": bool, "detail": "HTTP 500 ..."}.
    history = models.JSONField(default=list, blank=True)
    last_error = models.TextField(blank=True)
    # When the next attempt is due; while an attempt runs, when its claim lapses.
    next_attempt_at = models.DateTimeField(null=True, blank=True, db_index=True)
    sent_at = models.DateTimeField(null=True, blank=True)
    created = models.DateTimeField(default=timezone.now)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created", "-id"]
        verbose_name_plural = "deliveries"

    def __str__(self) -> str:
        return f"{self.get_channel_display()} of {self.notification} ({self.status})"
