"""One REDIS_URL, spelled for redis-py and for Celery."""

import pytest

from nanochat_site.redis_urls import celery_url, channels_url, unix_socket_path


def test_tcp_urls_pass_through():
    url = "redis://127.0.0.1:6379/3"
    assert celery_url(url) == url
    assert channels_url(url) == url
    assert unix_socket_path(url) is None


def test_unix_socket_urls_become_celery_socket_urls():
    assert celery_url("unix:///data/redis.sock") == "redis+socket:///data/redis.sock?virtual_host=0"
    assert celery_url("unix:///data/redis.sock?db=2").endswith("?virtual_host=2")
    assert channels_url("unix:///data/redis.sock") == "unix:///data/redis.sock"
    assert unix_socket_path("unix:///data/redis.sock") == "/data/redis.sock"


@pytest.mark.parametrize("url,message", [
    ("http://localhost:6379", "scheme must be one of"),
    ("localhost:6379", "scheme must be one of"),
    ("unix://", "needs the socket path"),
    ("unix:///x.sock?db=two", "db must be a number"),
])  # fmt: skip
def test_bad_urls_name_the_problem(url, message):
    with pytest.raises(ValueError, match=message):
        celery_url(url)
