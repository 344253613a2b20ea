"""The Alerts page and its forms, mounted at /alerts/."""

from django.urls import path

from alerts import pages

urlpatterns = [
    path("", pages.alerts, name="alerts"),
    path("settings/", pages.save_settings, name="alerts-settings"),
    path("rules/", pages.add_rule, name="alerts-add-rule"),
    path("rules/<int:rule_id>/<str:action>/", pages.rule_action, name="alerts-rule-action"),
    path("test/", pages.send_test, name="alerts-test"),
]
