"""Alerts end to end: a real run through a real Celery worker, a real webhook receiver.

A dataset run (the cheapest real run: a few seconds, no torchrun) is submitted through the
API; a `celery worker` process on the test database and Redis executes it, its end sends the
run_finished signal in that process, the delivery task goes through Redis to the worker's
`default` queue and POSTs to an HTTP server in this process: it answers 500 first, so the
delivery is retried (ALERT_RETRY_BASE_SECONDS=1 here) and arrives on the second attempt.
With the receiver down the run still succeeds and the delivery gives up after its attempts.
"""

from __future__ import annotations

import socket

import pytest
from rest_framework.test import APIClient

from alerts.models import AlertSettings, Delivery
from runs.models import Dataset, Run, Status
from tests.runs.live_workers import LiveWorker, wait_for

pytestmark = [pytest.mark.services, pytest.mark.timeout(300),
              pytest.mark.django_db(transaction=True)]  # fmt: skip

ENV = {
    "ALERT_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1", "ALERT_RETRY_BASE_SECONDS": "1",
    "ALERT_MAX_ATTEMPTS": "3", "SITE_URL": "http://nanochat.test",
}  # fmt: skip


@pytest.fixture(scope="module")
def worker(redis_url, tmp_path_factory, django_db_setup, django_db_blocker):
    """One worker on both queues: it runs the run, then the deliveries its end queued."""
    logs = tmp_path_factory.mktemp("alert-workers")
    with django_db_blocker.unblock():
        process = LiveWorker("training,default", logs, **ENV)
    yield process
    process.stop()


@pytest.fixture
def api(alice):
    client = APIClient()
    client.force_authenticate(alice)
    return client


def build_dataset(api, name: str) -> Run:
    answer = api.post(
        "/api/datasets/",
        {"name": name, "source": "builtin", "options": {"max_chars": 60000, "shards": 2}},
        format="json",
    )
    assert answer.status_code == 201, answer.content
    return Dataset.objects.get(name=name).runs.get(kind="dataset")


def wait_run(run: Run, worker) -> Run:
    return wait_for(
        lambda: Run.objects.filter(pk=run.pk, status__in=("succeeded", "failed")).first(),
        120, f"run {run.pk} to end", info=worker.log,
    )  # fmt: skip


def test_a_run_that_ends_reaches_the_webhook_after_a_retry(api, alice, worker, receiver):
    server = receiver(statuses=(500, 200))
    AlertSettings.objects.create(user=alice, webhook_enabled=True, webhook_url=server.url)
    run = wait_run(build_dataset(api, "alerts-live"), worker)
    assert run.status == Status.SUCCEEDED, run.error

    assert server.arrived.wait(60), f"no webhook arrived\n{worker.log()}"
    item = wait_for(
        lambda: Delivery.objects.filter(notification__run=run, status="sent").first(),
        30, "the delivery to be recorded as sent", info=worker.log,
    )  # fmt: skip
    assert item.attempts == 2 and item.last_error.startswith("HTTP 500")
    assert [h["ok"] for h in item.history] == [False, True]
    assert len(server.requests) == 2 and server.requests[0]["raw"] == server.requests[1]["raw"]
    body = server.requests[1]["json"]
    assert body["event"] == "run.succeeded"
    assert body["run"]["id"] == run.pk and body["run"]["status"] == "succeeded"
    assert body["run"]["kind"] == "dataset"
    assert body["run"]["url"] == f"http://nanochat.test/runs/{run.pk}/"
    assert body["text"].startswith(f"Run 'dataset alerts-live' (dataset #{run.pk}) succeeded")


def test_a_webhook_that_is_down_does_not_touch_the_run(api, alice, worker):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    AlertSettings.objects.create(user=alice, webhook_enabled=True, on_failed=True,
                                 webhook_url=f"http://127.0.0.1:{port}/hook")  # fmt: skip
    run = wait_run(build_dataset(api, "alerts-down"), worker)
    item = wait_for(
        lambda: Delivery.objects.filter(notification__run=run, status="failed").first(),
        60, "the delivery to give up", info=worker.log,
    )  # fmt: skip
    assert item.attempts == 3 and item.last_error.startswith("could not connect")
    run.refresh_from_db()
    assert run.status == Status.SUCCEEDED and run.exit_code == 0 and run.error == ""
    assert Dataset.objects.get(name="alerts-down").status == "ready"
