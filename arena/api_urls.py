"""Routes of the arena API, mounted under /api/arena/."""

from django.urls import path
from rest_framework.routers import SimpleRouter

from arena import api

app_name = "arena-api"

router = SimpleRouter()
router.register("battles", api.BattleViewSet, basename="battle")

urlpatterns = [
    path("ratings/", api.RatingsView.as_view(), name="ratings"),
    *router.urls,
]
