"""The Alerts page: the signed-in user's channels, threshold rules, a test button and what was
sent lately. Forms post to small views that call alerts/services.py (as the API does) and
redirect back; a refused value re-renders the page with the field's error next to it and
what the user typed kept."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_POST

from alerts import services
from alerts.models import AlertRule
from training.flags import ConfigError

RECENT_DELIVERIES = 25
# Offered by the rule form's metric field (any name a program writes may be typed).
SUGGESTED_METRICS = ("val/bpb", "train/loss", "core", "chatcore", "train/mfu",
                     "train/tok_per_sec", "train/grad_norm")  # fmt: skip
CONSOLE_BACKEND = "django.core.mail.backends.console.EmailBackend"


def _render(request, status: int = 200, **context: Any):
    found = services.settings_of(request.user)
    context.setdefault("form", {f: getattr(found, f) for f in ("webhook_url", "email",
                                                               *services.BOOLEAN_FIELDS)})  # fmt: skip
    context.setdefault("rule_form", {"comparison": AlertRule.Comparison.BELOW, "enabled": True})
    return render(
        request, "alerts/alerts.html",
        {
            "rules": services.rules_of(request.user),
            "deliveries": services.deliveries_of(request.user)[:RECENT_DELIVERIES],
            "comparisons": AlertRule.Comparison.values,
            "suggested_metrics": SUGGESTED_METRICS,
            "mail_configured": settings.EMAIL_BACKEND != CONSOLE_BACKEND,
            "max_rules": services.MAX_RULES,
            "errors": {}, "rule_errors": {},
            **context,
        },
        status=status,
    )  # fmt: skip


@login_required
@require_GET
def alerts(request):
    return _render(request)


@login_required
@require_POST
def save_settings(request):
    data: dict[str, Any] = {
        "webhook_url": request.POST.get("webhook_url", ""),
        "email": request.POST.get("email", ""),
    }
    for field in services.BOOLEAN_FIELDS:
        data[field] = field in request.POST  # an unticked box is not sent at all
    try:
        services.update_settings(request.user, data)
    except ConfigError as exc:
        return _render(request, 400, form=data, errors=exc.errors)
    messages.success(request, "Alert settings saved.")
    return redirect("alerts")


@login_required
@require_POST
def add_rule(request):
    data = {
        "metric": request.POST.get("metric", ""),
        "comparison": request.POST.get("comparison", ""),
        "value": request.POST.get("value", ""),
        "tag": request.POST.get("tag", ""),
        "enabled": "enabled" in request.POST,
    }
    try:
        rule = services.create_rule(request.user, data)
    except ConfigError as exc:
        return _render(request, 400, rule_form=data, rule_errors=exc.errors)
    messages.success(request, f"Rule added: {rule}.")
    return redirect("alerts")


@login_required
@require_POST
def rule_action(request, rule_id: int, action: str):
    """Delete a rule, or turn it on or off."""
    try:
        if action == "delete":
            services.delete_rule(request.user, rule_id)
            messages.success(request, "Rule deleted.")
        elif action in ("enable", "disable"):
            services.update_rule(request.user, rule_id, {"enabled": action == "enable"})
            messages.success(request, f"Rule {'on' if action == 'enable' else 'off'}.")
        else:
            messages.error(request, f"Unknown action {action[:20]!r}.")
    except services.NotFound as exc:
        messages.error(request, f"{str(exc).capitalize()}.")
    return redirect("alerts")


@login_required
@require_POST
def send_test(request):
    try:
        made = services.send_test(request.user)
    except ConfigError as exc:
        messages.error(request, "; ".join(exc.errors.values()).capitalize() + ".")
    except services.TooSoon as exc:
        messages.error(request, f"{str(exc).capitalize()}.")
    else:
        where = ", ".join(d.get_channel_display() for d in made.deliveries.order_by("pk"))
        messages.success(request, f"Test notification queued ({where}); see below.")
    return redirect("alerts")
