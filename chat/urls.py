"""URL routes of the chat app, mounted at /chat/ by nanochat_site/urls.py."""

from django.urls import path

from chat import views

app_name = "chat"

urlpatterns = [
    path("api/stats/", views.engine_stats, name="engine-stats"),
]
