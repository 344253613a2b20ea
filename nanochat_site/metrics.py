"""Prometheus metrics: `/metrics` in the text exposition format.

Two kinds of numbers, collected two ways:

- Site-wide facts (runs by kind and status, Celery queue depths, Celery and engine workers,
  running runs' heartbeat ages) live in the database and Redis, which every process shares.
  `SiteCollector` reads them afresh at each scrape, so any web process answers the same and no
  prometheus_client multiprocess mode (with its shared-directory bookkeeping) is needed.
- HTTP requests (`MetricsMiddleware`) are counted in the process that served them, in the
  default registry. With several web processes each has its own counts: scrape each process,
  or sum them in PromQL; the numbers restart from zero when a process restarts, which
  Prometheus' rate() handles as a counter reset.

Engine workers publish, with their running totals, two histograms of their replies since they
started (chat/stats.py): time to first token and decode tokens/s. They are exposed per worker
rather than summed over workers: a worker that stops takes its counts with it, and a sum that
drops would read to rate() as a counter reset (a false burst); per-worker series just end.
`sum by (le)` in PromQL aggregates them. They are not labelled by model: a worker serves any
number of checkpoints over its life, which would make the series unbounded.

Ingest lag, per running run: `nanochat_run_ingest_lag_bytes` is how much of the run's event
file the worker following it has not stored yet (file size minus the stored read position;
a file the web process cannot see, such as on a GPU node's own disk, gives no sample), and
`nanochat_run_last_event_age_seconds` is how long ago the newest stored event was written (by
the program's clock): growing bytes mean the follower is stuck; a growing age with no bytes
behind means the program itself went quiet.
"""

from __future__ import annotations

import hmac
import ipaddress
import math
import time
from functools import reduce
from operator import or_
from pathlib import Path

import redis
from django.conf import settings
from django.db.models import Count, Q
from django.http import HttpRequest, HttpResponse
from django.utils import timezone
from django.views.decorators.http import require_GET
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from chat.stats import histogram_buckets, read_stats
from nanochat_site import health
from runs.models import Kind, Run, RunEvent, Status
from training.events import EVENTS_FILE

# A scrape waits this long for Celery workers to answer the broadcast; it is the floor of every
# scrape's duration, so it stays well under Prometheus' default 10 s scrape timeout.
CELERY_REPLY_TIMEOUT = 0.5
# kombu's Redis transport keeps a queue's messages of priority N>0 under `queue\x06\x16N`.
_PRIORITY_SEP = "\x06\x16"
_PRIORITIES = (3, 6, 9)


def celery_queues() -> list[str]:
    """The queues the site's tasks are routed to (the default one and those of the routes)."""
    names = {settings.CELERY_TASK_DEFAULT_QUEUE}
    names.update(route["queue"] for route in settings.CELERY_TASK_ROUTES.values())
    return sorted(names)


def queue_depths() -> dict[str, int]:
    """Messages waiting in each Celery queue: the length of its Redis lists (taken but not
    yet acknowledged messages are not waiting and are not counted)."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        depths = {}
        for queue in celery_queues():
            keys = [queue, *(f"{queue}{_PRIORITY_SEP}{p}" for p in _PRIORITIES)]
            depths[queue] = sum(client.llen(key) for key in keys)
        return depths
    finally:
        client.close()


class SiteCollector(Collector):
    """Reads the site's shared state at scrape time. Each part is read on its own, so Redis
    being down still leaves the database's numbers; `nanochat_scrape_part_ok` says which
    parts answered."""

    def collect(self):
        ok = GaugeMetricFamily(
            "nanochat_scrape_part_ok",
            "1 when this part of the scrape could be read, 0 when it failed",
            labels=["part"],
        )
        for part, read in (
            ("runs", self._runs),
            ("queues", self._queues),
            ("celery", self._celery),
            ("engine", self._engine),
        ):
            try:
                families = list(read())
            except Exception:  # a scrape reports what it can; the failure shows in the gauge
                ok.add_metric([part], 0)
                continue
            ok.add_metric([part], 1)
            yield from families
        yield ok

    def _runs(self):
        runs = GaugeMetricFamily(
            "nanochat_runs", "Runs in the database by kind and status", labels=["kind", "status"]
        )
        counts = {
            (row["kind"], row["status"]): row["n"]
            for row in Run.objects.values("kind", "status").annotate(n=Count("id")).order_by()
        }
        # Every combination is listed, zeros too, so a series does not vanish when it empties.
        for kind in Kind.values:
            for status in Status.values:
                runs.add_metric([kind, status], counts.get((kind, status), 0))
        yield runs

        age = GaugeMetricFamily(
            "nanochat_run_heartbeat_age_seconds",
            "Seconds since each running run's task last wrote its heartbeat "
            "(the reconciler fails it past RUNS_STALE_SECONDS)",
            labels=["run", "kind"],
        )
        now = timezone.now()
        running = list(
            Run.objects.filter(status=Status.RUNNING).values(
                "id", "kind", "heartbeat_at", "run_dir", "events_offset", "events_count"
            )
        )
        for run in running:
            if run["heartbeat_at"] is not None:
                age.add_metric(
                    [str(run["id"]), run["kind"]], (now - run["heartbeat_at"]).total_seconds()
                )
        yield age
        yield from self._ingest_lag(running, now.timestamp())

    def _ingest_lag(self, running: list[dict], now: float):
        behind = GaugeMetricFamily(
            "nanochat_run_ingest_lag_bytes",
            "Bytes of a running run's event file not stored yet (absent where this web process "
            "cannot see the file)",
            labels=["run", "kind"],
        )
        last = GaugeMetricFamily(
            "nanochat_run_last_event_age_seconds",
            "Seconds since the newest stored event of a running run was written",
            labels=["run", "kind"],
        )
        for run in running:
            if not run["run_dir"]:
                continue
            try:  # one stat per running run; run_dir is the site's own layout, never user text
                size = (Path(run["run_dir"]) / EVENTS_FILE).stat().st_size
            except OSError:
                continue
            behind.add_metric([str(run["id"]), run["kind"]], max(0, size - run["events_offset"]))
        # The newest stored event of each run is its last sequence number: one indexed query.
        newest = [
            Q(run_id=r["id"], seq=r["events_count"] - 1) for r in running if r["events_count"]
        ]
        if newest:
            kinds = {r["id"]: r["kind"] for r in running}
            for run_id, written in RunEvent.objects.filter(reduce(or_, newest)).values_list(
                "run_id", "time"
            ):
                if math.isfinite(written):
                    last.add_metric([str(run_id), kinds[run_id]], max(0.0, now - written))
        yield behind
        yield last

    def _queues(self):
        depth = GaugeMetricFamily(
            "nanochat_celery_queue_length", "Messages waiting in a Celery queue", labels=["queue"]
        )
        for queue, n in queue_depths().items():
            depth.add_metric([queue], n)
        yield depth

    def _celery(self):
        result = health.celery_workers(timeout=CELERY_REPLY_TIMEOUT)
        if not result["ok"]:
            raise RuntimeError(result["error"])
        up = GaugeMetricFamily(
            "nanochat_celery_worker_up",
            "Celery workers that answered the scrape's broadcast, with the queues they consume",
            labels=["worker", "queue"],
        )
        for worker in result["workers"]:
            for queue in worker["queues"]:
                up.add_metric([worker["name"], queue], 1)
        yield up
        yield GaugeMetricFamily(
            "nanochat_celery_workers", "Celery workers that answered", value=len(result["workers"])
        )

    def _engine(self):
        workers = read_stats()
        now = time.time()
        yield GaugeMetricFamily(
            "nanochat_engine_workers", "Live chat engine workers", value=len(workers)
        )
        labels = ["worker", "device"]
        gauges = {
            "capacity": GaugeMetricFamily(
                "nanochat_engine_capacity_rows", "Rows a worker decodes at once", labels=labels
            ),
            "active_rows": GaugeMetricFamily(
                "nanochat_engine_active_rows", "Rows being decoded now", labels=labels
            ),
            "queued": GaugeMetricFamily(
                "nanochat_engine_waiting_requests",
                "Requests taken by a worker and waiting for a row or a model load",
                labels=labels,
            ),
        }
        counters = {
            "tokens_served": CounterMetricFamily(
                "nanochat_engine_tokens_generated",
                "Tokens generated since the worker started",
                labels=labels,
            ),
            "requests_served": CounterMetricFamily(
                "nanochat_engine_requests_served",
                "Replies finished since the worker started",
                labels=labels,
            ),
        }
        histograms = {
            "time_to_first_token": HistogramMetricFamily(
                "nanochat_engine_time_to_first_token_seconds",
                "From a worker taking a request to the first token of any of its choices",
                labels=labels,
            ),
            "decode_tokens_per_second": HistogramMetricFamily(
                "nanochat_engine_decode_tokens_per_second",
                "A reply's tokens after the first divided by the time they took, per choice",
                labels=labels,
            ),
        }
        heartbeat = GaugeMetricFamily(
            "nanochat_engine_heartbeat_age_seconds",
            "Seconds since the worker last published its stats (it is dropped past "
            "CHAT_ENGINE_ALIVE_TTL)",
            labels=labels,
        )
        models = GaugeMetricFamily(
            "nanochat_engine_model_loaded",
            "Checkpoints in a worker's model cache (state: loading or ready)",
            labels=[*labels, "checkpoint", "step", "state"],
        )
        for w in workers:
            values = [w["worker"], w["device"]]
            for key, family in (*gauges.items(), *counters.items()):
                family.add_metric(values, w[key])
            heartbeat.add_metric(values, max(0.0, now - w["updated"]))
            for key, family in histograms.items():
                read = histogram_buckets(w.get(key))
                if read is not None:  # a worker of an older version publishes none
                    buckets, total = read
                    family.add_metric(
                        values, [(floatToGoString(le), n) for le, n in buckets], total
                    )
            for model in w["models"]:
                models.add_metric(
                    [*values, model["checkpoint"], str(model["step"]), model["state"]], 1
                )
        yield from gauges.values()
        yield from counters.values()
        yield from histograms.values()
        yield heartbeat
        yield models


# The site collector gets a registry of its own: the default one holds this process' HTTP
# metrics and prometheus_client's process/GC collectors, and the two outputs are concatenated.
SITE_REGISTRY = CollectorRegistry(auto_describe=False)
SITE_REGISTRY.register(SiteCollector())

_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}
HTTP_REQUESTS = Counter(
    "nanochat_http_requests",
    "HTTP requests served by this web process",
    ["method", "status"],
)
HTTP_LATENCY = Histogram(
    "nanochat_http_request_duration_seconds",
    "Time until the response (its headers, for a streamed one) in this web process",
    ["method", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


def _observe(request: HttpRequest, response: HttpResponse, start: float) -> None:
    # Labels are bounded: unknown methods fold into "other", statuses into their class.
    method = request.method if request.method in _METHODS else "other"
    status = f"{response.status_code // 100}xx"
    HTTP_REQUESTS.labels(method, status).inc()
    HTTP_LATENCY.labels(method, status).observe(time.perf_counter() - start)


class MetricsMiddleware:
    """Counts and times every request. Sync and async alike, so the async OpenAI views stay
    async instead of being pushed through a thread by a sync-only middleware."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response):
        from asgiref.sync import iscoroutinefunction, markcoroutinefunction

        self.get_response = get_response
        self._async = iscoroutinefunction(get_response)
        if self._async:
            markcoroutinefunction(self)

    def __call__(self, request):
        if self._async:
            return self._acall(request)
        start = time.perf_counter()
        response = self.get_response(request)
        _observe(request, response, start)
        return response

    async def _acall(self, request):
        start = time.perf_counter()
        response = await self.get_response(request)
        _observe(request, response, start)
        return response


def _address_allowed(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    for entry in settings.METRICS_ALLOWED_IPS:
        try:
            if ip in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue  # a malformed entry allows nothing rather than breaking the endpoint
    return False


def _refusal(request: HttpRequest) -> HttpResponse | None:
    """None when the scraper may read; else the 401/403 to send. With METRICS_TOKEN set the
    bearer token is the whole check (a scraper's address may change); without it only the
    allowed addresses may read, since the numbers describe the deployment."""
    token = settings.METRICS_TOKEN
    if token:
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            response = HttpResponse("metrics need a bearer token\n", status=401)
            response["WWW-Authenticate"] = 'Bearer realm="metrics"'
            return response
        if not hmac.compare_digest(given.strip().encode(), token.encode()):
            return HttpResponse("wrong metrics token\n", status=403)
        return None
    if not _address_allowed(request.META.get("REMOTE_ADDR", "")):
        return HttpResponse("metrics are not served to this address\n", status=403)
    return None


@require_GET
def metrics_view(request: HttpRequest) -> HttpResponse:
    """The Prometheus text format: this process' HTTP metrics, then the site's shared state."""
    refusal = _refusal(request)
    if refusal is not None:
        return refusal
    body = generate_latest(REGISTRY) + generate_latest(SITE_REGISTRY)
    return HttpResponse(body, content_type=CONTENT_TYPE_LATEST)
