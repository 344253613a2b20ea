"""Engine workers' live stats, kept in Redis where any web process can read them.

Each worker rewrites one JSON key every second with a short expiry, so the set of keys is the
set of live workers: a worker that dies simply disappears a few seconds later, with no
registry to clean up. Keys are grouped by engine channel, so workers of another deployment
(or of a test) sharing the Redis server are not counted. The same key is the worker's liveness
signal: a front end waiting on a reply checks it (`Liveness`) to tell a dead worker from a slow
one.
"""

from __future__ import annotations

import json
from typing import Any

import redis
import redis.asyncio
from django.conf import settings

_PREFIX = "nanochat:chat:engine-stats"


def _key(engine_channel: str, worker: str) -> str:
    return f"{_PREFIX}:{engine_channel}:{worker}"


class StatsPublisher:
    """Writes one worker's stats; `ttl` seconds after the last write the worker is gone."""

    def __init__(self, redis_url: str, engine_channel: str, worker: str, ttl: float) -> None:
        self._client = redis.asyncio.from_url(redis_url)
        self._key = _key(engine_channel, worker)
        self._ttl_ms = max(1, int(ttl * 1000))

    async def publish(self, stats: dict[str, Any]) -> None:
        await self._client.set(self._key, json.dumps(stats), px=self._ttl_ms)

    async def close(self) -> None:
        """Remove the key at once (a clean shutdown) and close the connection."""
        try:
            await self._client.delete(self._key)
        finally:
            await self._client.aclose()


class Liveness:
    """Whether one worker's key still exists, asked by a reply that waits on that worker."""

    def __init__(self, engine_channel: str, worker: str) -> None:
        self._client = redis.asyncio.from_url(settings.REDIS_URL)
        self._key = _key(engine_channel, worker)

    async def alive(self) -> bool:
        """False once the key expired; True while it exists or Redis cannot be asked (then
        the reply's own receive fails, with a better message)."""
        try:
            return bool(await self._client.exists(self._key))
        except (redis.RedisError, OSError):
            return True

    async def close(self) -> None:
        await self._client.aclose()


def read_stats(engine_channel: str | None = None) -> list[dict[str, Any]]:
    """The stats of every live worker on `engine_channel` (default: the configured one)."""
    channel = engine_channel or settings.CHAT_ENGINE_CHANNEL
    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        keys = sorted(client.scan_iter(match=_key(channel, "*"), count=100))
        values = client.mget(keys) if keys else []
    finally:
        client.close()
    return [json.loads(value) for value in values if value is not None]


def summary(workers: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals over workers, for a health or stats endpoint."""
    return {
        "workers": len(workers),
        "active_rows": sum(w["active_rows"] for w in workers),
        "queued": sum(w["queued"] for w in workers),
        "capacity": sum(w["capacity"] for w in workers),
        "tokens_served": sum(w["tokens_served"] for w in workers),
        "requests_served": sum(w["requests_served"] for w in workers),
    }
