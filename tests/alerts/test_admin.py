"""The alerts admin: every page opens with data present, the log is read-only, a webhook URL
typed there meets the same address policy, and failed deliveries can be sent again."""

from __future__ import annotations

import pytest
from django.urls import reverse
from django.utils import timezone

from alerts.models import AlertRule, AlertSettings, Delivery, Notification

pytestmark = pytest.mark.django_db


@pytest.fixture
def data(admin_user):
    found = AlertSettings.objects.create(user=admin_user, webhook_enabled=True,
                                         webhook_url="https://93.184.215.14/h")  # fmt: skip
    rule = AlertRule.objects.create(user=admin_user, metric="val/bpb", comparison="below", value=1)
    made = Notification.objects.create(user=admin_user, event="test", text="hi",
                                       payload={"text": "hi"})  # fmt: skip
    item = Delivery.objects.create(notification=made, channel="webhook", target="https://x/",
                                   status="failed", attempts=5, last_error="HTTP 500",
                                   history=[{"at": "t", "ok": False, "detail": "HTTP 500"}])  # fmt: skip
    return {AlertSettings: found, AlertRule: rule, Notification: made, Delivery: item}


@pytest.fixture
def staff_client(client, admin_user):
    client.force_login(admin_user)
    return client


MODELS = [AlertSettings, AlertRule, Notification, Delivery]


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_staff_opens_every_list_and_page(staff_client, data, model):
    name = model._meta.model_name
    listed = staff_client.get(reverse(f"admin:alerts_{name}_changelist"))
    assert listed.status_code == 200 and data[model] in listed.context["cl"].result_list
    assert (
        staff_client.get(reverse(f"admin:alerts_{name}_change", args=[data[model].pk])).status_code
        == 200
    )


def test_the_delivery_log_cannot_be_added_to(staff_client, data):
    for model in (Notification, Delivery):
        url = reverse(f"admin:alerts_{model._meta.model_name}_add")
        assert staff_client.get(url).status_code == 403


def test_a_private_webhook_is_refused_in_the_admin_too(staff_client, data, admin_user):
    found = data[AlertSettings]
    url = reverse("admin:alerts_alertsettings_change", args=[found.pk])
    answer = staff_client.post(url, {"user": admin_user.pk, "webhook_enabled": "on",
                                     "webhook_url": "http://10.0.0.1/x", "email": ""})  # fmt: skip
    assert answer.status_code == 200 and "private address" in answer.content.decode()
    found.refresh_from_db()
    assert found.webhook_url == "https://93.184.215.14/h"


def test_send_again_requeues_failed_deliveries(
    staff_client, data, queued, django_capture_on_commit_callbacks
):
    item = data[Delivery]
    with django_capture_on_commit_callbacks(execute=True):
        staff_client.post(reverse("admin:alerts_delivery_changelist"),
                          {"action": "send_again", "_selected_action": [item.pk]})  # fmt: skip
    item.refresh_from_db()
    assert item.status == "pending" and item.attempts == 0 and queued == [item.pk]
    assert item.next_attempt_at <= timezone.now()
