"""Engine workers' live stats, kept in Redis where any web process can read them.

Each worker rewrites one JSON key every second with a short expiry, so the set of keys is the
set of live workers: a worker that dies simply disappears a few seconds later, with no
registry to clean up. Keys are grouped by engine channel, so workers of another deployment
(or of a test) sharing the Redis server are not counted. The same key is the worker's liveness
signal: a front end waiting on a reply checks it (`Liveness`) to tell a dead worker from a slow
one.

The same key carries two histograms of the worker's replies since it started
(`ReplyHistogram`): time to first token and decode tokens/s. A worker records each reply in
memory when it ends and the stats tick publishes the counts, so timing costs no Redis call per
token or per reply; /metrics (nanochat_site/metrics.py) turns them into Prometheus histograms.
"""

from __future__ import annotations

import bisect
import json
import math
from typing import Any

import redis
import redis.asyncio
from django.conf import settings

_PREFIX = "nanochat:chat:engine-stats"


# Upper bounds of the reply histograms' buckets, fixed here for every worker and the collector
# alike. Time to first token runs from a cached model's next step (tens of ms) to a cold model
# load behind a queue (a minute); decode speed from a CPU worker's few tokens/s to a GPU
# row's thousands.
TTFT_BUCKETS: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
DECODE_SPEED_BUCKETS: tuple[float, ...] = (
    1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
)  # fmt: skip


class ReplyHistogram:
    """Counts of observations per bucket, their sum and number, in one worker's memory.

    `snapshot()` is what the worker publishes: the bounds go with the counts, so a collector
    reading a worker of another version (other bounds) still gets a consistent histogram.
    """

    def __init__(self, bounds: tuple[float, ...]) -> None:
        if list(bounds) != sorted(set(bounds)) or not all(math.isfinite(b) for b in bounds):
            raise ValueError(f"bucket bounds must be finite and strictly increasing: {bounds}")
        self.bounds = tuple(bounds)
        self._counts = [0] * (len(bounds) + 1)  # per bucket, the last one above every bound
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Count one value (a NaN or negative one, which a clock cannot give, is ignored)."""
        if not value >= 0 or math.isinf(value):
            return
        # Prometheus buckets are "less than or equal": a value on a bound belongs to it.
        self._counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def snapshot(self) -> dict[str, Any]:
        """{"bounds", "cumulative" (one count per bound, then the total), "sum", "count"}."""
        cumulative, running = [], 0
        for n in self._counts:
            running += n
            cumulative.append(running)
        return {"bounds": list(self.bounds), "cumulative": cumulative,
                "sum": self.sum, "count": self.count}  # fmt: skip


def histogram_buckets(snapshot: Any) -> tuple[list[tuple[float, int]], float] | None:
    """A published snapshot as (upper bound, cumulative count) pairs ending with (inf, count),
    and the sum; None when it is missing or malformed (a worker of another version), so one
    odd worker cannot break a scrape."""
    try:
        bounds, cumulative = snapshot["bounds"], snapshot["cumulative"]
        total, count = float(snapshot["sum"]), snapshot["count"]
        ok = (
            len(cumulative) == len(bounds) + 1
            and all(type(n) is int and n >= 0 for n in cumulative)
            and all(a <= b for a, b in zip(cumulative, cumulative[1:], strict=False))
            and cumulative[-1] == count
            and math.isfinite(total)
            and total >= 0
            and all(isinstance(b, int | float) and math.isfinite(b) for b in bounds)
            and all(a < b for a, b in zip(bounds, bounds[1:], strict=False))
        )
    except (KeyError, TypeError, ValueError):
        return None
    if not ok:
        return None
    buckets = [(float(b), n) for b, n in zip(bounds, cumulative, strict=False)]
    buckets.append((math.inf, count))
    return buckets, total


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
