"""First-start chores shared by `manage.py up`, `manage.py setup` and the tests: the admin account.

The first admin's password is also written to a file in the data home, readable only by its
owner, so it is not lost when the console that showed it scrolls away or is closed.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction


def password_file() -> Path:
    return settings.NANOCHAT_HOME / "admin_password"


def save_password(password: str, path: Path | None = None) -> Path:
    """Write the password to `path` with mode 0600, created that way (never briefly readable
    by others) and tightened if the file already existed with a looser mode."""
    path = path or password_file()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        os.fchmod(handle.fileno(), 0o600)
        handle.write(password + "\n")
    return path


@transaction.atomic
def ensure_superuser(username: str = "admin") -> tuple[str, str | None]:
    """Make sure a superuser exists.

    Returns (username, password) when one was created now -- the password from
    NANOCHAT_ADMIN_PASSWORD, or a generated one the caller prints once; either way it is saved
    to password_file() -- and (existing username, None) when a superuser already existed.
    """
    User = get_user_model()
    existing = User.objects.filter(is_superuser=True).order_by("pk").first()
    if existing is not None:
        return existing.get_username(), None
    password = os.environ.get("NANOCHAT_ADMIN_PASSWORD") or secrets.token_urlsafe(12)
    User.objects.create_superuser(username=username, email="", password=password)
    save_password(password)
    return username, password
