"""Translate one REDIS_URL into the spellings that redis-py (Channels) and Celery expect.

Users configure a single `REDIS_URL` (`redis://`, `rediss://` or `unix:///path/to.sock`);
redis-py reads unix sockets as `unix://path?db=N` while Celery's broker and result backend
want `redis+socket://path` with the database as `virtual_host`.
"""

from urllib.parse import parse_qs, urlsplit

_SCHEMES = ("redis", "rediss", "unix")


def _check(url: str):
    parts = urlsplit(url)
    if parts.scheme not in _SCHEMES:
        raise ValueError(
            f"REDIS_URL={url!r}: scheme must be one of {', '.join(_SCHEMES)} "
            "(for example redis://127.0.0.1:6379/0 or unix:///path/to/redis.sock)"
        )
    if parts.scheme == "unix" and not parts.path:
        raise ValueError(f"REDIS_URL={url!r}: a unix URL needs the socket path")
    return parts


def channels_url(url: str) -> str:
    """The URL for channels_redis (redis-py `from_url`): accepted as given once checked."""
    _check(url)
    return url


def celery_url(url: str) -> str:
    """The URL for Celery's Redis broker and result backend."""
    parts = _check(url)
    if parts.scheme != "unix":
        return url
    db = parse_qs(parts.query).get("db", ["0"])[0]
    if not db.isdigit():
        raise ValueError(f"REDIS_URL={url!r}: db must be a number, got {db!r}")
    return f"redis+socket://{parts.path}?virtual_host={db}"


def unix_socket_path(url: str) -> str | None:
    """The socket path of a unix URL, None for TCP URLs."""
    parts = _check(url)
    return parts.path if parts.scheme == "unix" else None
