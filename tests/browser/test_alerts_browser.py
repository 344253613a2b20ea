"""The Alerts page in a real browser: reach it from the top bar, fill the channels form (a
refused address first, its error shown by the field), add a threshold rule, and read every
value back from the page after a fresh load. The site is the product's daphne (bare_site)."""

from __future__ import annotations

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from alerts.models import AlertRule, AlertSettings
from tests.browser.test_dashboard_browser import PASSWORD, log_in, wait

pytestmark = [
    pytest.mark.services,
    pytest.mark.timeout(180),
    pytest.mark.django_db(transaction=True),
]

HOOK = "https://93.184.215.14/services/T000/B000/XXXX"  # a public address: saved, never called


@pytest.fixture
def alice(django_user_model, settings):
    # The site runs the product settings: a password hasher they know.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.PBKDF2PasswordHasher"]
    return django_user_model.objects.create_user("alice", "alice@example.com", PASSWORD)


def type_into(browser, field_id: str, text: str) -> None:
    field = browser.find_element(By.ID, field_id)
    field.clear()
    field.send_keys(text)


def value(browser, field_id: str) -> str:
    return browser.find_element(By.ID, field_id).get_attribute("value")


def checked(browser, field_id: str) -> bool:
    return browser.find_element(By.ID, field_id).is_selected()


def test_fill_the_alerts_form_add_a_rule_and_read_them_back(browser, bare_site, alice):
    log_in(browser, bare_site, alice)
    browser.find_element(By.LINK_TEXT, "Alerts").click()
    wait(browser).until(lambda d: d.find_elements(By.ID, "alert-settings"))
    assert browser.find_element(By.TAG_NAME, "h1").text == "Alerts"
    assert "alice@example.com" in browser.find_element(By.ID, "id_email").get_attribute(
        "placeholder"
    )

    # A private address is refused, next to the field, with what was typed kept.
    browser.find_element(By.ID, "id_webhook_enabled").click()
    type_into(browser, "id_webhook_url", "http://192.168.0.10/hook")
    browser.find_element(By.ID, "save-settings").click()
    error = wait(browser).until(
        lambda d: d.find_element(By.CSS_SELECTOR, '[data-error-for="webhook_url"]')
    )
    assert "private address" in error.text
    assert value(browser, "id_webhook_url") == "http://192.168.0.10/hook"
    assert not AlertSettings.objects.filter(user=alice, webhook_enabled=True).exists()

    type_into(browser, "id_webhook_url", HOOK)
    browser.find_element(By.ID, "id_email_enabled").click()
    type_into(browser, "id_email", "ops@example.com")
    browser.find_element(By.ID, "id_on_succeeded").click()  # off: only failures and cancels
    browser.find_element(By.ID, "id_on_cancelled").click()
    browser.find_element(By.ID, "save-settings").click()
    wait(browser).until(
        lambda d: "Alert settings saved." in d.find_element(By.TAG_NAME, "main").text
    )

    type_into(browser, "id_metric", "val/bpb")
    Select(browser.find_element(By.ID, "id_comparison")).select_by_value("below")
    type_into(browser, "id_value", "1.25")
    type_into(browser, "id_tag", "Baseline")
    browser.find_element(By.ID, "add-rule-button").click()
    wait(browser).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#rules-table tr[data-rule]"))

    browser.get(f"{bare_site.url}/alerts/")  # a fresh load: everything from the database
    assert value(browser, "id_webhook_url") == HOOK and checked(browser, "id_webhook_enabled")
    assert value(browser, "id_email") == "ops@example.com" and checked(browser, "id_email_enabled")
    assert not checked(browser, "id_on_succeeded")
    assert checked(browser, "id_on_failed") and checked(browser, "id_on_cancelled")
    assert not checked(browser, "id_include_stages")
    (row,) = browser.find_elements(By.CSS_SELECTOR, "#rules-table tr[data-rule]")
    cells = {name: row.find_element(By.CLASS_NAME, f"rule-{name}").text
             for name in ("metric", "comparison", "value", "tag", "state")}  # fmt: skip
    assert cells == {"metric": "val/bpb", "comparison": "below", "value": "1.25",
                     "tag": "tagged baseline", "state": "on"}  # fmt: skip

    stored = AlertSettings.objects.get(user=alice)
    assert (stored.webhook_url, stored.email, stored.on_succeeded) == (HOOK, "ops@example.com",
                                                                       False)  # fmt: skip
    rule = AlertRule.objects.get(user=alice)
    assert (rule.metric, rule.comparison, rule.value, rule.tag) == ("val/bpb", "below", 1.25,
                                                                    "baseline")  # fmt: skip

    row.find_element(By.CSS_SELECTOR, "button.delete-rule").click()
    wait(browser).until(lambda d: d.find_elements(By.ID, "no-rules"))
    assert not AlertRule.objects.filter(user=alice).exists()
