"""Pages of the arena app (mounted at /arena/)."""

from django.urls import path

from arena import views

urlpatterns = [
    path("", views.arena_page, name="arena"),
]
