"""/api/alerts/ and the Alerts page: the user's own settings, rules and deliveries; every bad
value a 400 naming its field; another user's objects answer 404 (API) or "no such" (page)."""

from __future__ import annotations

import pytest
from django.utils import timezone

from alerts import services
from alerts.models import AlertRule, AlertSettings, Delivery, Notification

pytestmark = pytest.mark.django_db

OPENAPI_JSON = "application/vnd.oai.openapi+json"
PUBLIC_HOOK = "https://93.184.215.14/services/T000/B000/XXXX"  # a public address literal


def test_settings_start_with_defaults_and_change_field_by_field(api, alice, settings):
    alice.email = "alice@example.com"
    alice.save()
    client = api(alice)
    got = client.get("/api/alerts/settings/").json()
    assert got["webhook_enabled"] is False and got["email_enabled"] is False
    assert (got["on_succeeded"], got["on_failed"], got["on_cancelled"]) == (True, True, False)
    assert got["email"] == "" and got["email_to"] == "alice@example.com"

    answer = client.patch("/api/alerts/settings/", {"webhook_url": PUBLIC_HOOK,
                          "webhook_enabled": True, "on_cancelled": True}, format="json")  # fmt: skip
    assert answer.status_code == 200, answer.content
    assert answer.json()["webhook_url"] == PUBLIC_HOOK and answer.json()["on_cancelled"] is True
    answer = client.patch("/api/alerts/settings/", {"email": "ops@example.com",
                          "email_enabled": True}, format="json")  # fmt: skip
    stored = AlertSettings.objects.get(user=alice)
    assert stored.webhook_enabled and stored.webhook_url == PUBLIC_HOOK
    assert stored.email_to == "ops@example.com" and answer.json()["email_to"] == "ops@example.com"


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"webhook_url": "ftp://example.org/x"}, "webhook_url", "http:// or https://"),
        ({"webhook_url": "http://127.0.0.1:8000/x"}, "webhook_url", "ALERT_WEBHOOK_ALLOWED_HOSTS"),
        ({"webhook_url": "http://10.1.2.3/x"}, "webhook_url", "private"),
        ({"webhook_url": "http://169.254.169.254/latest"}, "webhook_url", "link-local"),
        ({"webhook_url": "http://[::ffff:127.0.0.1]/"}, "webhook_url", "loopback"),
        ({"webhook_url": "https://no-such-host.invalid/x"}, "webhook_url", "does not resolve"),
        ({"webhook_url": "https://u:p@93.184.215.14/x"}, "webhook_url", "password"),
        ({"webhook_url": "https://93.184.215.14/" + "a" * 2000}, "webhook_url", "at most 2000"),
        ({"webhook_url": 5}, "webhook_url", "must be a string"),
        ({"webhook_enabled": True}, "webhook_url", "enter the webhook's URL"),
        ({"email": "not an address"}, "email", "valid e-mail"),
        ({"email_enabled": True}, "email", "no e-mail address"),
        ({"on_failed": "maybe"}, "on_failed", "true or false"),
        ({"include_stages": None}, "include_stages", "true or false"),
    ],
)  # fmt: skip
def test_bad_settings_are_a_400_naming_the_field(api, alice, body, field, words):
    answer = api(alice).patch("/api/alerts/settings/", body, format="json")
    assert answer.status_code == 400, answer.content
    assert field in answer.json() and words in answer.json()[field][0], answer.json()
    assert not AlertSettings.objects.filter(user=alice, webhook_enabled=True).exists()


def test_an_allowed_private_host_may_be_saved(api, alice, settings):
    settings.ALERT_WEBHOOK_ALLOWED_HOSTS = ["127.0.0.1"]
    answer = api(alice).patch("/api/alerts/settings/", {"webhook_url": "http://127.0.0.1:9/h",
                              "webhook_enabled": True}, format="json")  # fmt: skip
    assert answer.status_code == 200, answer.content


def test_the_body_must_be_a_json_object(api, alice):
    answer = api(alice).patch("/api/alerts/settings/", [1, 2], format="json")
    assert answer.status_code == 400 and "non_field_errors" in answer.json()


def test_rules_are_created_read_changed_and_deleted(api, alice):
    client = api(alice)
    answer = client.post("/api/alerts/rules/", {"metric": "val/bpb", "comparison": "below",
                         "value": 1.5, "tag": " Baseline "}, format="json")  # fmt: skip
    assert answer.status_code == 201, answer.content
    rule = answer.json()
    assert rule["metric"] == "val/bpb" and rule["value"] == 1.5 and rule["enabled"] is True
    assert rule["tag"] == "baseline"  # normalized as runs/tags.py writes tags
    assert client.get("/api/alerts/rules/").json() == [rule]
    assert client.get(f"/api/alerts/rules/{rule['id']}/").json() == rule

    changed = client.patch(f"/api/alerts/rules/{rule['id']}/", {"comparison": "above",
                           "enabled": False}, format="json").json()  # fmt: skip
    assert changed["comparison"] == "above" and changed["enabled"] is False
    assert changed["value"] == 1.5
    assert client.delete(f"/api/alerts/rules/{rule['id']}/").status_code == 204
    assert not AlertRule.objects.exists()


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"comparison": "below", "value": 1}, "metric", "required"),
        ({"metric": "", "comparison": "below", "value": 1}, "metric", "name a metric"),
        ({"metric": "a" * 65, "comparison": "below", "value": 1}, "metric", "at most 64"),
        ({"metric": "val/bpb;drop", "comparison": "below", "value": 1}, "metric", "only letters"),
        ({"metric": "val/bpb", "comparison": "under", "value": 1}, "comparison", "'below'"),
        ({"metric": "val/bpb", "comparison": "below", "value": "nan"}, "value", "finite"),
        ({"metric": "val/bpb", "comparison": "below", "value": "1e999"}, "value", "finite"),
        ({"metric": "val/bpb", "comparison": "below", "value": True}, "value", "a number"),
        ({"metric": "val/bpb", "comparison": "below", "value": [1]}, "value", "a number"),
        ({"metric": "val/bpb", "comparison": "below", "value": 1, "tag": "a<b"}, "tag", "only"),
        ({"metric": "val/bpb", "comparison": "below", "value": 1, "enabled": 3}, "enabled", "true"),
    ],
)  # fmt: skip
def test_bad_rules_are_a_400_naming_the_field(api, alice, body, field, words):
    answer = api(alice).post("/api/alerts/rules/", body, format="json")
    assert answer.status_code == 400, answer.content
    assert words in answer.json()[field][0], answer.json()
    assert not AlertRule.objects.exists()


def test_a_user_has_at_most_so_many_rules(api, alice, monkeypatch):
    monkeypatch.setattr(services, "MAX_RULES", 2)
    client = api(alice)
    body = {"metric": "val/bpb", "comparison": "below", "value": 1}
    assert [client.post("/api/alerts/rules/", body, format="json").status_code
            for _ in range(3)] == [201, 201, 400]  # fmt: skip
    assert AlertRule.objects.count() == 2


def make_delivery(user) -> Delivery:
    made = Notification.objects.create(user=user, event="test", text="hi", payload={"text": "hi"})
    return Delivery.objects.create(notification=made, channel="webhook", target=PUBLIC_HOOK,
                                   next_attempt_at=timezone.now())  # fmt: skip


def test_another_users_objects_are_404_and_never_listed(api, alice, bob):
    theirs = AlertRule.objects.create(user=bob, metric="val/bpb", comparison="below", value=1)
    their_delivery = make_delivery(bob)
    mine = make_delivery(alice)
    client = api(alice, token=True)
    for method, body in (("get", None), ("patch", {"value": 3}), ("delete", None)):
        answer = getattr(client, method)(f"/api/alerts/rules/{theirs.pk}/", body, format="json")
        assert answer.status_code == 404, (method, answer.content)
    assert client.get(f"/api/alerts/deliveries/{their_delivery.pk}/").status_code == 404
    assert client.get("/api/alerts/rules/").json() == []
    listed = client.get("/api/alerts/deliveries/").json()
    assert [d["id"] for d in listed["results"]] == [mine.pk]
    got = client.get(f"/api/alerts/deliveries/{mine.pk}/").json()
    assert got["target"] == PUBLIC_HOOK and got["event"] == "test" and got["payload"]
    theirs.refresh_from_db()
    assert theirs.value == 1
    assert client.get("/api/alerts/rules/abc/").status_code == 404
    assert client.post(f"/api/alerts/deliveries/{mine.pk}/", {}).status_code == 405


def test_anonymous_clients_are_refused(api):
    for path in ("/api/alerts/settings/", "/api/alerts/rules/", "/api/alerts/deliveries/"):
        assert api().get(path).status_code == 403, path


def test_the_test_endpoint_needs_a_channel_and_then_waits_between_tests(api, alice, queued):
    client = api(alice)
    answer = client.post("/api/alerts/test/")
    assert answer.status_code == 400 and "turn the webhook" in answer.json()["non_field_errors"][0]
    AlertSettings.objects.filter(user=alice).update(webhook_enabled=True, webhook_url=PUBLIC_HOOK)
    answer = client.post("/api/alerts/test/")
    assert answer.status_code == 202, answer.content
    (item,) = answer.json()["deliveries"]
    assert item["channel"] == "webhook" and item["status"] == "pending"
    again = client.post("/api/alerts/test/")
    assert again.status_code == 429 and int(again["Retry-After"]) >= 1


def test_the_schema_documents_the_alerts_api(api, alice):
    paths = api(alice).get("/api/schema/", HTTP_ACCEPT=OPENAPI_JSON).json()["paths"]
    assert set(paths["/api/alerts/settings/"]) == {"get", "patch"}
    assert set(paths["/api/alerts/rules/{id}/"]) == {"get", "patch", "delete"}
    assert set(paths["/api/alerts/deliveries/{id}/"]) == {"get"}
    assert "429" in paths["/api/alerts/test/"]["post"]["responses"]


# ---- the page -------------------------------------------------------------------------------


def test_the_page_saves_settings_and_shows_errors_next_to_the_field(client, alice):
    client.force_login(alice)
    page = client.get("/alerts/")
    assert page.status_code == 200 and b"Threshold rules" in page.content
    answer = client.post("/alerts/settings/", {"webhook_url": "http://192.168.1.5/x",
                         "webhook_enabled": "on", "on_failed": "on"})  # fmt: skip
    assert answer.status_code == 400
    html = answer.content.decode()
    assert 'data-error-for="webhook_url"' in html and "private address" in html
    assert 'value="http://192.168.1.5/x"' in html  # what was typed is kept
    assert not AlertSettings.objects.filter(user=alice, webhook_enabled=True).exists()

    answer = client.post("/alerts/settings/", {"webhook_url": PUBLIC_HOOK,
                         "webhook_enabled": "on", "on_failed": "on"})  # fmt: skip
    assert answer.status_code == 302
    stored = AlertSettings.objects.get(user=alice)
    assert stored.webhook_enabled and not stored.on_succeeded and stored.on_failed


def test_the_page_adds_turns_off_and_deletes_rules_of_its_user_only(client, alice, bob):
    client.force_login(alice)
    answer = client.post("/alerts/rules/", {"metric": "val/bpb", "comparison": "below",
                         "value": "abc", "enabled": "on"})  # fmt: skip
    assert answer.status_code == 400 and 'data-error-for="value"' in answer.content.decode()
    client.post("/alerts/rules/", {"metric": "val/bpb", "comparison": "below", "value": "1.25",
                                   "tag": "baseline", "enabled": "on"})  # fmt: skip
    rule = AlertRule.objects.get(user=alice)
    assert (rule.metric, rule.comparison, rule.value, rule.tag) == ("val/bpb", "below", 1.25,
                                                                    "baseline")  # fmt: skip
    client.post(f"/alerts/rules/{rule.pk}/disable/")
    rule.refresh_from_db()
    assert rule.enabled is False

    theirs = AlertRule.objects.create(user=bob, metric="x", comparison="above", value=1)
    page = client.post(f"/alerts/rules/{theirs.pk}/delete/", follow=True).content.decode()
    assert "No such alert rule." in page and AlertRule.objects.filter(pk=theirs.pk).exists()
    client.post(f"/alerts/rules/{rule.pk}/delete/")
    assert not AlertRule.objects.filter(user=alice).exists()


def test_the_page_lists_only_the_users_deliveries(client, alice, bob):
    mine, theirs = make_delivery(alice), make_delivery(bob)
    client.force_login(alice)
    html = client.get("/alerts/").content.decode()
    assert f'data-delivery="{mine.pk}"' in html and f'data-delivery="{theirs.pk}"' not in html


def test_anonymous_browsers_are_sent_to_log_in(client):
    assert client.get("/alerts/")["Location"].startswith("/login/")
    assert client.post("/alerts/test/")["Location"].startswith("/login/")
