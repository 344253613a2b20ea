"""/metrics: Prometheus text format, numbers from the database, HTTP counts, access control,
engine workers' reply histograms and running runs' ingest lag."""

import json
import math
import time
import uuid

import pytest
import redis
from asgiref.sync import async_to_sync
from django.test import override_settings
from prometheus_client.parser import text_string_to_metric_families

from chat.stats import (
    DECODE_SPEED_BUCKETS,
    TTFT_BUCKETS,
    ReplyHistogram,
    StatsPublisher,
    histogram_buckets,
)
from runs.follow import Follower
from runs.models import Kind, Run, Status
from training.events import EVENTS_FILE, EventWriter

pytestmark = pytest.mark.django_db


def scrape(client, **extra) -> dict:
    """Samples of one scrape, keyed by (name, sorted labels)."""
    response = client.get("/metrics", **extra)
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.content.decode())
        for sample in family.samples
    }


def test_output_parses_and_counts_runs_by_kind_and_status(client, redis_url):
    for _ in range(2):
        Run.objects.create(kind=Kind.BASE, status=Status.RUNNING)
    Run.objects.create(kind=Kind.BASE, status=Status.FAILED)
    Run.objects.create(kind=Kind.SFT, status=Status.SUCCEEDED)
    # A known training queue: an earlier test may have left messages in it.
    broker = redis.Redis.from_url(redis_url)
    for key in broker.keys("training*"):
        broker.delete(key)
    broker.rpush("training", "a", "b")
    try:
        samples = scrape(client)
    finally:
        broker.delete("training")
        broker.close()

    def runs(kind, status):
        return samples[("nanochat_runs", (("kind", kind), ("status", status)))]

    assert runs("base", "running") == 2
    assert runs("base", "failed") == 1
    assert runs("sft", "succeeded") == 1
    assert runs("rl", "queued") == 0  # empty combinations are listed, not missing
    for part in ("runs", "queues", "celery", "engine"):
        assert samples[("nanochat_scrape_part_ok", (("part", part),))] == 1, part
    assert samples[("nanochat_celery_queue_length", (("queue", "training"),))] == 2
    assert samples[("nanochat_engine_workers", ())] == 0


def test_http_counter_counts_a_request(client, redis_url):
    key = ("nanochat_http_requests_total", (("method", "GET"), ("status", "3xx")))
    before = scrape(client).get(key, 0)
    assert client.get("/").status_code == 302  # anonymous home: sent to the login page
    assert scrape(client)[key] == before + 1


@override_settings(METRICS_TOKEN="s3cret")
def test_token_is_required_when_set(client, redis_url):
    missing = client.get("/metrics")
    assert missing.status_code == 401
    assert missing["WWW-Authenticate"].startswith("Bearer")
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 403
    # The token, not the address, decides: a remote scraper with it gets in.
    samples = scrape(client, HTTP_AUTHORIZATION="Bearer s3cret", REMOTE_ADDR="203.0.113.9")
    assert ("nanochat_engine_workers", ()) in samples


@override_settings(METRICS_TOKEN="", METRICS_ALLOWED_IPS=["127.0.0.1", "10.1.0.0/16"])
def test_only_allowed_addresses_without_a_token(client, redis_url):
    assert client.get("/metrics", REMOTE_ADDR="203.0.113.9").status_code == 403
    assert client.get("/metrics", REMOTE_ADDR="::1").status_code == 403  # not listed here
    assert client.get("/metrics", REMOTE_ADDR="10.1.2.3").status_code == 200
    assert client.get("/metrics", REMOTE_ADDR="127.0.0.1").status_code == 200


def test_async_requests_are_counted_too(async_client):
    """Under ASGI the middleware runs as a coroutine (the OpenAI views are async)."""
    from asgiref.sync import async_to_sync

    from nanochat_site.metrics import HTTP_REQUESTS

    counter = HTTP_REQUESTS.labels("GET", "3xx")
    before = counter._value.get()
    assert async_to_sync(async_client.get)("/").status_code == 302
    assert counter._value.get() == before + 1


def test_reply_histogram_counts_each_value_in_the_first_bucket_that_holds_it():
    hist = ReplyHistogram((0.1, 1.0, 10.0))
    for value in (0.05, 0.1, 0.5, 3.0, 10.0, 99.0, float("nan"), -1.0, float("inf")):
        hist.observe(value)
    snap = hist.snapshot()
    # A value on a bound counts in it (Prometheus' "le"); NaN, negative and inf are dropped.
    assert snap["cumulative"] == [2, 3, 5, 6]
    assert snap["count"] == 6 and snap["sum"] == pytest.approx(0.05 + 0.1 + 0.5 + 3 + 10 + 99)
    assert snap["bounds"] == [0.1, 1.0, 10.0]
    buckets, total = histogram_buckets(json.loads(json.dumps(snap)))  # as read from Redis
    assert buckets == [(0.1, 2), (1.0, 3), (10.0, 5), (math.inf, 6)]
    assert total == snap["sum"]
    for bounds in ((1.0, 1.0), (2.0, 1.0), (1.0, float("inf"))):
        with pytest.raises(ValueError):
            ReplyHistogram(bounds)


@pytest.mark.parametrize(
    "snapshot",
    [
        None,
        {},
        {"bounds": [1.0], "cumulative": [1, 2], "sum": 3.0},  # no count
        {"bounds": [1.0], "cumulative": [2], "sum": 3.0, "count": 2},  # no +Inf bucket
        {"bounds": [1.0], "cumulative": [2, 1], "sum": 3.0, "count": 1},  # decreasing
        {"bounds": [1.0], "cumulative": [1, 2], "sum": 3.0, "count": 5},  # +Inf != count
        {"bounds": [2.0, 1.0, 3.0], "cumulative": [0, 0, 0, 0], "sum": 0, "count": 0},
        {"bounds": [1.0], "cumulative": [-1, 0], "sum": 0, "count": 0},
        {"bounds": [1.0], "cumulative": [1.5, 2], "sum": 3.0, "count": 2},
        {"bounds": [1.0], "cumulative": [1, 2], "sum": "NaN", "count": 2},
        {"bounds": "ab", "cumulative": [1, 2, 2], "sum": 1.0, "count": 2},
    ],
)
def test_a_malformed_published_histogram_is_skipped(snapshot):
    assert histogram_buckets(snapshot) is None


def publish_worker(redis_url: str, channel: str, stats: dict) -> None:
    """Publish `stats` the way a worker's tick does (kept 60 s: the test reads it at once)."""

    async def publish():
        publisher = StatsPublisher(redis_url, channel, stats["worker"], ttl=60)
        try:
            await publisher.publish(stats)
        finally:
            await publisher._client.aclose()  # close() would delete the key

    async_to_sync(publish)()


def worker_stats(name: str, ttft: ReplyHistogram, speed: ReplyHistogram | None) -> dict:
    stats = {
        "worker": name, "device": "cpu", "capacity": 4, "active_rows": 0, "queued": 0,
        "tokens_served": 10, "requests_served": 2, "models": [], "updated": time.time(),
        "time_to_first_token": ttft.snapshot(),
    }  # fmt: skip
    if speed is not None:
        stats["decode_tokens_per_second"] = speed.snapshot()
    return stats


def test_workers_histograms_are_exposed_per_worker_and_an_old_worker_is_skipped(
    client, redis_url, settings
):
    settings.CHAT_ENGINE_CHANNEL = channel = f"metrics-{uuid.uuid4().hex[:8]}"
    a_ttft, a_speed = ReplyHistogram(TTFT_BUCKETS), ReplyHistogram(DECODE_SPEED_BUCKETS)
    for value in (0.02, 0.3, 4.0):
        a_ttft.observe(value)
    a_speed.observe(120.0)
    b_ttft = ReplyHistogram((0.5, 5.0))  # a worker of another version: its own bounds
    b_ttft.observe(1.0)
    publish_worker(redis_url, channel, worker_stats("a", a_ttft, a_speed))
    publish_worker(
        redis_url, channel, worker_stats("b", b_ttft, None)
    )  # predates the speed histogram
    publish_worker(
        redis_url, channel, {**worker_stats("c", a_ttft, a_speed), "time_to_first_token": [1]}
    )

    response = client.get("/metrics")
    families = {f.name: f for f in text_string_to_metric_families(response.content.decode())}
    ttft = families["nanochat_engine_time_to_first_token_seconds"]
    assert ttft.type == "histogram"

    def samples(family, worker):
        return {
            (s.name.removeprefix(family.name), s.labels.get("le")): s.value
            for s in family.samples
            if s.labels["worker"] == worker
        }

    a = samples(ttft, "a")
    assert a[("_count", None)] == 3 and a[("_sum", None)] == pytest.approx(4.32)
    assert a[("_bucket", "0.025")] == 1 and a[("_bucket", "0.5")] == 2
    assert a[("_bucket", "+Inf")] == 3
    buckets = [v for (suffix, le), v in a.items() if suffix == "_bucket"]
    assert len(buckets) == len(TTFT_BUCKETS) + 1 and buckets == sorted(buckets)
    assert samples(ttft, "b") == {
        ("_bucket", "0.5"): 0, ("_bucket", "5.0"): 1, ("_bucket", "+Inf"): 1,
        ("_count", None): 1, ("_sum", None): 1.0,
    }  # fmt: skip
    assert samples(ttft, "c") == {}  # malformed: left out, the rest of the scrape stands
    speed = families["nanochat_engine_decode_tokens_per_second"]
    assert samples(speed, "a")[("_bucket", "250.0")] == 1
    assert samples(speed, "a")[("_bucket", "100.0")] == 0
    assert samples(speed, "b") == {}
    part = families["nanochat_scrape_part_ok"]
    assert {s.labels["part"]: s.value for s in part.samples}["engine"] == 1


def test_ingest_lag_is_the_event_file_bytes_not_stored_yet(client, redis_url, tmp_path):
    run = Run.objects.create(kind=Kind.BASE, status=Status.RUNNING, run_dir=str(tmp_path))
    unseen = Run.objects.create(kind=Kind.SFT, status=Status.RUNNING, run_dir="/nonexistent/x")
    writer = EventWriter(tmp_path)
    writer.emit("metrics", step=1, values={"train/loss": 3.0})
    follower = Follower(run)

    def lag(name):
        samples = scrape(client)
        return samples.get((name, (("kind", "base"), ("run", str(run.pk)))))

    size = (tmp_path / EVENTS_FILE).stat().st_size
    assert lag("nanochat_run_ingest_lag_bytes") == size  # nothing stored yet
    assert lag("nanochat_run_last_event_age_seconds") is None  # no event stored yet
    follower.poll()
    assert lag("nanochat_run_ingest_lag_bytes") == 0
    assert 0 <= lag("nanochat_run_last_event_age_seconds") < 60

    writer.emit("metrics", step=2, values={"train/loss": 2.5, "train/lr": 0.01})
    grown = (tmp_path / EVENTS_FILE).stat().st_size
    assert lag("nanochat_run_ingest_lag_bytes") == grown - size
    follower.poll()
    assert lag("nanochat_run_ingest_lag_bytes") == 0

    # The newest stored event's age follows the program's own clock in the file.
    writer.emit("metrics", step=3, values={"train/loss": 2.4})
    follower.poll()
    run.refresh_from_db()
    run.events.filter(seq=run.events_count - 1).update(time=time.time() - 3600)
    assert 3590 < lag("nanochat_run_last_event_age_seconds") < 3700
    samples = scrape(client)
    # A run whose file this process cannot see has no lag sample, and a finished run none.
    assert not any(dict(labels).get("run") == str(unseen.pk) for _, labels in samples)
    Run.objects.filter(pk=run.pk).update(status=Status.SUCCEEDED)
    assert lag("nanochat_run_ingest_lag_bytes") is None
