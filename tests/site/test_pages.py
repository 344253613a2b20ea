"""Home, login and health pages (Django test client, real database)."""

import pytest
from django.urls import reverse

pytestmark = pytest.mark.django_db


def test_home_redirects_anonymous_users_to_login(client):
    response = client.get(reverse("home"))
    assert response.status_code == 302
    assert response["Location"] == f"{reverse('login')}?next=/"


def test_login_page_renders(client):
    response = client.get(reverse("login"))
    assert response.status_code == 200
    assert b'name="password"' in response.content


def test_login_then_home(client, admin_user):
    response = client.post(reverse("login"), {"username": "root", "password": "pw-for-tests"})
    assert response.status_code == 302 and response["Location"] == reverse("home")
    home = client.get(reverse("home"))
    assert home.status_code == 200
    assert b"Dashboard" in home.content
    assert b"/admin/" in home.content  # staff see the admin link


def test_bad_login_says_so(client, admin_user):
    response = client.post(reverse("login"), {"username": "root", "password": "wrong"})
    assert response.status_code == 200
    assert b"didn't match" in response.content


def test_health_requires_login(client):
    assert client.get(reverse("health")).status_code == 302


def test_health_reports_database_and_layer(client, admin_user, redis_url):
    client.force_login(admin_user)
    response = client.get(reverse("health"))
    report = response.json()
    assert report["checks"]["database"]["ok"] is True
    assert report["checks"]["channel_layer"]["ok"] is True, report
    assert report["checks"]["channel_layer"]["backend"] == "RedisChannelLayer"
    assert "workers" in report["checks"]["celery"]
    assert response.status_code == 200


def test_api_docs_work_offline(client, admin_user):
    client.force_login(admin_user)
    docs = client.get(reverse("api-docs"))
    assert docs.status_code == 200
    assert b"swagger-ui" in docs.content
    assert b"//cdn" not in docs.content and b"https://" not in docs.content
    schema = client.get(reverse("api-schema"), HTTP_ACCEPT="application/json")
    assert schema.status_code == 200
    assert schema.json()["info"]["title"] == "nanochat site API"
