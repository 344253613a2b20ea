"""First-start chores shared by `manage.py up` and the tests: the admin account."""

from __future__ import annotations

import os
import secrets

from django.contrib.auth import get_user_model
from django.db import transaction


@transaction.atomic
def ensure_superuser(username: str = "admin") -> tuple[str, str | None]:
    """Make sure a superuser exists.

    Returns (username, password) when one was created now -- the password from
    NANOCHAT_ADMIN_PASSWORD, or a generated one the caller prints once -- and
    (existing username, None) when a superuser already existed.
    """
    User = get_user_model()
    existing = User.objects.filter(is_superuser=True).order_by("pk").first()
    if existing is not None:
        return existing.get_username(), None
    password = os.environ.get("NANOCHAT_ADMIN_PASSWORD") or secrets.token_urlsafe(12)
    User.objects.create_superuser(username=username, email="", password=password)
    return username, password
