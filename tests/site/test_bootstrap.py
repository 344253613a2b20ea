"""The first admin account."""

import stat

import pytest
from django.contrib.auth import authenticate

from nanochat_site.bootstrap import ensure_superuser, password_file

pytestmark = pytest.mark.django_db


def test_creates_admin_with_password_from_env(monkeypatch):
    monkeypatch.setenv("NANOCHAT_ADMIN_PASSWORD", "s3cret-pass")
    assert ensure_superuser() == ("admin", "s3cret-pass")
    assert authenticate(username="admin", password="s3cret-pass").is_superuser


def test_generates_a_password_once(monkeypatch):
    monkeypatch.delenv("NANOCHAT_ADMIN_PASSWORD", raising=False)
    username, password = ensure_superuser()
    assert username == "admin" and len(password) >= 12
    assert authenticate(username="admin", password=password) is not None
    assert ensure_superuser() == ("admin", None)  # existing admin: nothing new to print


def test_keeps_an_existing_superuser(django_user_model):
    django_user_model.objects.create_superuser("boss", "", "pw")
    assert ensure_superuser() == ("boss", None)
    assert not django_user_model.objects.filter(username="admin").exists()


def test_the_first_password_is_saved_readable_only_by_its_owner(monkeypatch, settings, tmp_path):
    settings.NANOCHAT_HOME = tmp_path
    monkeypatch.delenv("NANOCHAT_ADMIN_PASSWORD", raising=False)
    path = password_file()
    path.write_text("stale")
    path.chmod(0o644)  # left by an earlier data home: tightened, not trusted
    _, password = ensure_superuser()
    assert path.read_text() == password + "\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
