"""Routes of the alerts API, mounted under /api/alerts/."""

from django.urls import path
from rest_framework.routers import SimpleRouter

from alerts import api

app_name = "alerts-api"

router = SimpleRouter()
router.register("rules", api.RuleViewSet, basename="rule")
router.register("deliveries", api.DeliveryViewSet, basename="delivery")

urlpatterns = [
    path("settings/", api.SettingsView.as_view(), name="settings"),
    path("test/", api.TestView.as_view(), name="test"),
    *router.urls,
]
