"""Alerts' rules in one place, used by the page, the API, the admin and the signal receivers.

Input is checked here (ConfigError naming the field, like the runs' services), so the form and
the API refuse the same values with the same words. Triggers (`run_finished`,
`metrics_stored`) record a Notification under a unique key and queue one Delivery per enabled
channel once the transaction commits; sending is the Celery task's business (alerts/tasks.py).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import validate_email
from django.db import IntegrityError, transaction
from django.db.models import QuerySet
from django.urls import reverse
from django.utils import timezone

from alerts import rules, tasks, webhooks
from alerts.models import (
    METRIC_MAX_LENGTH,
    URL_MAX_LENGTH,
    AlertRule,
    AlertSettings,
    Delivery,
    Notification,
)
from runs import selectors
from runs.models import Run
from runs.tags import normalize_tag
from training.flags import ConfigError

MAX_RULES = 50
EMAIL_MAX_LENGTH = 254
TEST_INTERVAL_SECONDS = 10  # between two test notifications of one user
# Metric names as the programs write them: "train/loss", "val/bpb", "core", "eval/ARC-Easy".
METRIC_PATTERN = re.compile(r"[\w./:+@ -]+")
BOOLEAN_FIELDS = ("webhook_enabled", "email_enabled", "on_succeeded", "on_failed",
                  "on_cancelled", "include_stages")  # fmt: skip
_TRUE, _FALSE = {"true", "1", "on", "yes"}, {"false", "0", "off", "no", ""}


class NotFound(LookupError):
    """No such object of this user (another user's answers the same)."""


class TooSoon(Exception):
    """A test notification was sent moments ago; `retry_after` seconds until the next."""

    def __init__(self, retry_after: int):
        super().__init__(f"a test notification was sent moments ago; try again in {retry_after} s")
        self.retry_after = retry_after


# ---- input ---------------------------------------------------------------------------------


def _boolean(value: Any, field: str) -> bool:
    """A JSON boolean, or the words a form or a query string uses for one."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigError({field: "must be true or false"})


def _text(value: Any, field: str, limit: int) -> str:
    if not isinstance(value, str):
        raise ConfigError({field: "must be a string"})
    value = value.strip()
    if len(value) > limit:
        raise ConfigError({field: f"use at most {limit} characters"})
    if "\x00" in value:
        raise ConfigError({field: "must not contain NUL characters"})
    return value


def clean_webhook_url(value: Any) -> str:
    """'' (no webhook) or an http(s) URL to a public host, or one the admin allows."""
    url = _text(value, "webhook_url", URL_MAX_LENGTH)
    if url:
        try:
            webhooks.check_url(url, settings.ALERT_WEBHOOK_ALLOWED_HOSTS, URL_MAX_LENGTH)
        except webhooks.WebhookRefused as exc:
            raise ConfigError({"webhook_url": str(exc)}) from None
    return url


def clean_email(value: Any) -> str:
    address = _text(value, "email", EMAIL_MAX_LENGTH)
    if address:
        try:
            validate_email(address)
        except ValidationError:
            raise ConfigError({"email": "enter a valid e-mail address"}) from None
    return address


def clean_metric(value: Any) -> str:
    metric = _text(value, "metric", METRIC_MAX_LENGTH)
    if not metric:
        raise ConfigError({"metric": "name a metric, e.g. val/bpb"})
    if not METRIC_PATTERN.fullmatch(metric):
        raise ConfigError({"metric": "may hold only letters, digits, spaces and . / : + @ _ -"})
    return metric


def clean_value(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError({"value": "must be a number"})
    try:
        number = float(value)
    except (ValueError, OverflowError):
        raise ConfigError({"value": "must be a number"}) from None
    if not math.isfinite(number):
        raise ConfigError({"value": "must be a finite number"})
    return number


def clean_comparison(value: Any) -> str:
    if value not in AlertRule.Comparison.values:
        raise ConfigError({"comparison": "must be 'below' or 'above'"})
    return value


def clean_tag(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ConfigError({"tag": "must be a string"})
    if not value.strip():
        return ""
    try:
        return normalize_tag(value)
    except ValueError as exc:
        raise ConfigError({"tag": str(exc)}) from None


def _object(data: Any) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise ConfigError({"non_field_errors": "the body must be a JSON object"})
    return data


# ---- settings ------------------------------------------------------------------------------


def settings_of(user) -> AlertSettings:
    """The user's alert settings (created with the defaults on first use)."""
    found, _ = AlertSettings.objects.select_related("user").get_or_create(user=user)
    return found


def update_settings(user, data: Any) -> AlertSettings:
    """Change the fields present in `data`; all are checked before any is saved.

    A URL is checked against the address policy only when it changes, so saving other fields
    never fails on a URL that an admin's later change of the allow-list now refuses (its sends
    fail, and say why, in the delivery log).
    """
    data = _object(data)
    current = settings_of(user)
    values: dict[str, Any] = {}
    errors: dict[str, str] = {}
    checks = {"webhook_url": clean_webhook_url, "email": clean_email}
    for field, check in checks.items():
        if field in data and data[field] != getattr(current, field):
            try:
                values[field] = check(data[field])
            except ConfigError as exc:
                errors.update(exc.errors)
    for field in BOOLEAN_FIELDS:
        if field in data:
            try:
                values[field] = _boolean(data[field], field)
            except ConfigError as exc:
                errors.update(exc.errors)
    if errors:
        raise ConfigError(errors)
    merged = {f: values.get(f, getattr(current, f)) for f in ("webhook_url", "email",
                                                              *BOOLEAN_FIELDS)}  # fmt: skip
    if merged["webhook_enabled"] and not merged["webhook_url"]:
        errors["webhook_url"] = "enter the webhook's URL to turn it on"
    if merged["email_enabled"] and not (merged["email"] or user.email):
        errors["email"] = "your account has no e-mail address: enter one to turn e-mail on"
    if errors:
        raise ConfigError(errors)
    for field, value in values.items():
        setattr(current, field, value)
    current.save()
    return current


def channels(found: AlertSettings) -> list[tuple[str, str]]:
    """(channel, target) for each channel that is on and has somewhere to send to."""
    out = []
    if found.webhook_enabled and found.webhook_url:
        out.append((Delivery.Channel.WEBHOOK, found.webhook_url))
    if found.email_enabled and found.email_to:
        out.append((Delivery.Channel.EMAIL, found.email_to))
    return out


# ---- rules ---------------------------------------------------------------------------------


def rules_of(user) -> QuerySet:
    return AlertRule.objects.filter(user=user)


def rule_of(user, rule_id: Any) -> AlertRule:
    pk = _id(rule_id)
    rule = AlertRule.objects.filter(user=user, pk=pk).first() if pk else None
    if rule is None:
        raise NotFound("no such alert rule")
    return rule


def _id(value: Any) -> int | None:
    """A primary key from a URL or a form ("12"), or None for anything that cannot be one."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 19:
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2**63:
        return value
    return None


def _rule_fields(data: Mapping[str, Any], partial: bool) -> dict[str, Any]:
    checks = {
        "metric": clean_metric, "comparison": clean_comparison, "value": clean_value,
        "tag": clean_tag, "enabled": lambda v: _boolean(v, "enabled"),
    }  # fmt: skip
    fields: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for field, check in checks.items():
        if field not in data:
            if not partial and field in ("metric", "comparison", "value"):
                errors[field] = "this field is required"
            continue
        try:
            fields[field] = check(data[field])
        except ConfigError as exc:
            errors.update(exc.errors)
    if errors:
        raise ConfigError(errors)
    return fields


def create_rule(user, data: Any) -> AlertRule:
    fields = _rule_fields(_object(data), partial=False)
    with transaction.atomic():
        # Serialize one user's creations so two at once cannot both pass the limit.
        AlertSettings.objects.select_for_update().filter(pk=settings_of(user).pk).first()
        if rules_of(user).count() >= MAX_RULES:
            raise ConfigError({"non_field_errors": f"use at most {MAX_RULES} rules"})
        return AlertRule.objects.create(user=user, **fields)


def update_rule(user, rule_id: Any, data: Any) -> AlertRule:
    rule = rule_of(user, rule_id)
    for field, value in _rule_fields(_object(data), partial=True).items():
        setattr(rule, field, value)
    rule.save()
    return rule


def delete_rule(user, rule_id: Any) -> None:
    rule_of(user, rule_id).delete()


# ---- what was sent -------------------------------------------------------------------------


def deliveries_of(user) -> QuerySet:
    return (
        Delivery.objects.filter(notification__user=user)
        .select_related("notification", "notification__run")
        .order_by("-created", "-id")
    )


def delivery_of(user, delivery_id: Any) -> Delivery:
    pk = _id(delivery_id)
    found = deliveries_of(user).filter(pk=pk).first() if pk else None
    if found is None:
        raise NotFound("no such delivery")
    return found


# ---- triggers ------------------------------------------------------------------------------


def run_url(run: Run) -> str:
    return f"{settings.SITE_URL}{reverse('run-detail', args=[run.pk])}"


def _run_facts(run: Run) -> dict[str, Any]:
    values = selectors.final_metrics([run], rules.HEADLINE_METRICS)[run.pk]
    metrics = {name: value for name, value in values.items() if value is not None}
    return rules.run_facts(run, run_url(run), metrics)


def run_finished(run: Run) -> Notification | None:
    """Notify the owner that `run` ended, if they asked for this ending; once per launch."""
    event = rules.END_EVENTS.get(run.status)
    if event is None or run.owner_id is None:
        return None
    found = AlertSettings.objects.select_related("user").filter(user_id=run.owner_id).first()
    if found is None or not channels(found) or not getattr(found, f"on_{run.status}"):
        return None
    if run.pipeline_id and not found.include_stages:
        return None
    facts = _run_facts(run)
    text = rules.end_text(facts)
    body = rules.webhook_body(event, text, run=facts)
    return _notify(found, event, f"end:{run.pk}:{run.attempts}", text, body, run=run)


def metrics_stored(run: Run, points: list[tuple]) -> list[Notification]:
    """Notify the owner of each of their rules that these points cross for the first time."""
    if run.owner_id is None or not points:
        return []
    names = {point[0] for point in points}
    candidates = list(AlertRule.objects.filter(user_id=run.owner_id, enabled=True,
                                               metric__in=names))  # fmt: skip
    if not candidates:
        return []
    fired = set(
        Notification.objects.filter(run=run, rule__in=candidates).values_list("rule_id", flat=True)
    )
    candidates = [rule for rule in candidates if rule.pk not in fired]
    found = AlertSettings.objects.select_related("user").filter(user_id=run.owner_id).first()
    if not candidates or found is None or not channels(found):
        return []
    tags: set[str] | None = None
    sent = []
    for rule in candidates:
        if rule.tag:
            if tags is None:
                tags = _tags(run)
            if rule.tag not in tags:
                continue
        hit = rules.first_crossing(points, rule.metric, rule.comparison, rule.value)
        if hit is None:
            continue
        step, value = hit
        facts = _run_facts(run)
        described = {"id": rule.pk, "metric": rule.metric, "comparison": rule.comparison,
                     "value": rule.value, "tag": rule.tag}  # fmt: skip
        text = rules.threshold_text(facts, described, step, value)
        body = rules.webhook_body(Notification.Event.THRESHOLD, text, run=facts, rule=described,
                                  step=step, value=value)  # fmt: skip
        key = f"rule:{rule.pk}:run:{run.pk}"
        made = _notify(found, Notification.Event.THRESHOLD, key, text, body, run=run, rule=rule)
        if made is not None:
            sent.append(made)
    return sent


def _tags(run: Run) -> set[str]:
    """The run's tags; a pipeline stage's include its pipeline's (tagged as a whole)."""
    ids = [run.pk, run.pipeline_id] if run.pipeline_id else [run.pk]
    return set(Run.tags.through.objects.filter(run_id__in=ids).values_list("tag__name", flat=True))


def send_test(user) -> Notification:
    """A test notification on every enabled channel, at most one per TEST_INTERVAL_SECONDS."""
    found = settings_of(user)
    if not channels(found):
        raise ConfigError({"non_field_errors": "turn the webhook or e-mail on first"})
    recent = (
        Notification.objects.filter(user=user, event=Notification.Event.TEST)
        .order_by("-created")
        .values_list("created", flat=True)
        .first()
    )
    if recent is not None:
        wait = TEST_INTERVAL_SECONDS - (timezone.now() - recent).total_seconds()
        if wait > 0:
            raise TooSoon(math.ceil(wait))
    text = (
        f"Test notification for {user.get_username()}: nanochat alerts reach this channel · "
        f"{settings.SITE_URL}{reverse('alerts')}"
    )
    body = rules.webhook_body(Notification.Event.TEST, text)
    made = _notify(found, Notification.Event.TEST, None, text, body)
    assert made is not None  # no key, so never a duplicate
    return made


def _notify(
    found: AlertSettings, event: str, key: str | None, text: str, body: dict,
    run: Run | None = None, rule: AlertRule | None = None,
) -> Notification | None:  # fmt: skip
    """Record the notification and its deliveries; queue them once committed. None when the
    key was recorded before (this already notified)."""
    now = timezone.now()
    try:
        with transaction.atomic():
            made = Notification.objects.create(user_id=found.user_id, event=event, key=key,
                                               text=text, payload=body, run=run, rule=rule)  # fmt: skip
            items = Delivery.objects.bulk_create(
                [Delivery(notification=made, channel=channel, target=target, next_attempt_at=now)
                 for channel, target in channels(found)]
            )  # fmt: skip
    except IntegrityError:
        return None
    ids = [item.pk for item in items] if all(i.pk for i in items) else _delivery_ids(made)
    transaction.on_commit(lambda: [tasks.enqueue(pk) for pk in ids])
    return made


def _delivery_ids(made: Notification) -> list[int]:
    # bulk_create sets primary keys on PostgreSQL and SQLite >= 3.35; older ones need a read.
    return list(made.deliveries.values_list("pk", flat=True))


def resend(delivery_ids: Iterable[int]) -> int:
    """Try failed deliveries again from scratch (the admin's action); how many were queued."""
    now = timezone.now()
    ids = list(
        Delivery.objects.filter(pk__in=list(delivery_ids), status=Delivery.Status.FAILED)
        .values_list("pk", flat=True)
    )  # fmt: skip
    Delivery.objects.filter(pk__in=ids).update(
        status=Delivery.Status.PENDING, attempts=0, next_attempt_at=now, updated=now
    )
    transaction.on_commit(lambda: [tasks.enqueue(pk) for pk in ids])
    return len(ids)
