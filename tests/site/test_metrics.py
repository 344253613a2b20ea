"""/metrics: Prometheus text format, numbers from the database, HTTP counts, access control."""

import pytest
from django.test import override_settings
from prometheus_client.parser import text_string_to_metric_families

from runs.models import Kind, Run, Status

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

    samples = scrape(client)

    def runs(kind, status):
        return samples[("nanochat_runs", (("kind", kind), ("status", status)))]

    assert runs("base", "running") == 2
    assert runs("base", "failed") == 1
    assert runs("sft", "succeeded") == 1
    assert runs("rl", "queued") == 0  # empty combinations are listed, not missing
    for part in ("runs", "queues", "celery", "engine"):
        assert samples[("nanochat_scrape_part_ok", (("part", part),))] == 1, part
    assert samples[("nanochat_celery_queue_length", (("queue", "training"),))] == 0
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
