"""Fixtures shared by the whole suite."""

import subprocess
import time

import pytest
from django.conf import settings

from nanochat_site import embedded_redis


@pytest.fixture(scope="session")
def redis_url():
    """A running Redis for in-process tests: REDIS_URL when set, else an embedded server."""
    if not settings.REDIS_EMBEDDED:
        yield settings.REDIS_URL
        return
    sock = settings.EMBEDDED_REDIS_SOCKET
    embedded_redis.prepare(sock)
    server = subprocess.Popen(
        embedded_redis.server_argv(sock), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 15
        while not embedded_redis.answers(sock):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"embedded Redis did not start on {sock}")
            time.sleep(0.05)
        yield settings.REDIS_URL
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture
def admin_user(django_user_model):
    return django_user_model.objects.create_superuser("root", "", "pw-for-tests")
