"""Engine worker stats: published to Redis by each worker, served as JSON at /chat/api/stats/."""

import pytest
from django.test import Client
from django.urls import include, path

from chat.stats import read_stats, summary

pytestmark = pytest.mark.django_db

# The site mounts chat/urls.py at /chat/; these tests mount it the same way on their own.
urlpatterns = [path("chat/", include("chat.urls"))]


def test_a_live_worker_publishes_its_stats(engine):
    workers = read_stats(engine.channel)
    assert len(workers) == 1
    worker = workers[0]
    assert worker["pid"] == engine.proc.pid and worker["device"] == "cpu"
    assert worker["capacity"] == 4 and worker["in_flight"] == worker["active_rows"] == 0
    assert summary(workers)["workers"] == 1
    assert read_stats("engine-nobody-here") == []


@pytest.mark.urls("tests.chat.test_stats")
def test_stats_endpoint_needs_a_login_and_lists_the_workers(admin_user, engine):
    client = Client()
    assert client.get("/chat/api/stats/").status_code == 403
    client.force_login(admin_user)
    body = client.get("/chat/api/stats/").json()
    assert body["workers"] == 1 and body["capacity"] == 4
    assert body["worker_stats"][0]["pid"] == engine.proc.pid
    assert client.post("/chat/api/stats/").status_code == 405


@pytest.mark.urls("tests.chat.test_stats")
def test_stats_endpoint_answers_503_while_redis_is_away(admin_user, settings):
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there
    client = Client()
    client.force_login(admin_user)
    response = client.get("/chat/api/stats/")
    assert response.status_code == 503
    assert response.json()["detail"].startswith("engine stats unavailable: Redis:")
