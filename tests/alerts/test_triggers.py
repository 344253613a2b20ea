"""When alerts fire: a run's end through the worker's own code paths (execution._finish,
mark_lost, a pipeline's stage ending, cancel of a queued run) and threshold rules through the
real Follower reading an events.jsonl written with the programs' EventWriter.

Signals are sent on commit, so each trigger runs inside django_capture_on_commit_callbacks
(execute=True), which runs the callbacks as a commit would.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from alerts import services
from alerts.models import AlertRule, AlertSettings, Delivery, Notification
from runs import services as run_services
from runs.execution import _finish, mark_lost
from runs.follow import Follower, StageFollowers
from runs.models import Kind, MetricPoint, Run, Status, Tag
from training.events import EventWriter

pytestmark = pytest.mark.django_db

HOOK = "http://127.0.0.1:9/hook"  # allowed by local_webhooks; never called here


@pytest.fixture
def channels_on(alice, local_webhooks):
    alice.email = "alice@example.com"
    alice.save()
    return AlertSettings.objects.create(
        user=alice, webhook_enabled=True, webhook_url=HOOK, email_enabled=True
    )


@pytest.fixture
def running(alice, make_run):
    def make(**fields) -> Run:
        started = timezone.now() - timedelta(seconds=130)
        run = make_run(alice, Status.RUNNING, started_at=started, heartbeat_at=started, **fields)
        Path(run.run_dir).mkdir(parents=True, exist_ok=True)
        return run

    return make


def finish(capture, run, status=Status.SUCCEEDED, error=""):
    with capture(execute=True):
        _finish(run, status, 0 if status == Status.SUCCEEDED else 1, error, "")


def test_a_run_that_succeeds_notifies_each_enabled_channel_once(
    channels_on, running, queued, django_capture_on_commit_callbacks
):
    run = running(best_val_bpb=1.25)
    MetricPoint.objects.create(run=run, name="train/loss", step=5, value=2.5, time=1.0)
    finish(django_capture_on_commit_callbacks, run)

    made = Notification.objects.get()
    assert made.event == "run.succeeded" and made.run == run and made.user == run.owner
    assert made.text.startswith(f"Run 'tiny run' (base #{run.pk}) succeeded after 2m 1")
    assert "best val bpb 1.25" in made.text and f"http://nanochat.test/runs/{run.pk}/" in made.text
    body = made.payload
    assert body["event"] == "run.succeeded" and body["text"] == made.text
    assert body["run"]["id"] == run.pk and body["run"]["status"] == "succeeded"
    assert body["run"]["url"] == f"http://nanochat.test/runs/{run.pk}/"
    assert body["run"]["metrics"] == {"train/loss": 2.5}
    deliveries = {d.channel: d for d in made.deliveries.all()}
    assert deliveries["webhook"].target == HOOK
    assert deliveries["email"].target == "alice@example.com"
    assert all(d.status == "pending" and d.attempts == 0 for d in deliveries.values())
    assert sorted(queued) == sorted(d.pk for d in deliveries.values())

    # The same launch ending again (a reconciler racing the worker) notifies nobody again...
    finish(django_capture_on_commit_callbacks, run)
    assert Notification.objects.count() == 1 and len(queued) == 2
    # ...but a resumed launch that ends is news again.
    Run.objects.filter(pk=run.pk).update(attempts=run.attempts + 1)
    run.refresh_from_db()
    finish(django_capture_on_commit_callbacks, run, Status.FAILED, "boom")
    latest = Notification.objects.order_by("-pk").first()
    assert Notification.objects.count() == 2 and latest.event == "run.failed"
    assert "error: boom" in latest.text


def test_only_the_endings_asked_for_notify(
    alice, channels_on, make_run, running, queued, django_capture_on_commit_callbacks
):
    capture = django_capture_on_commit_callbacks
    assert channels_on.on_cancelled is False  # the default: you cancelled it yourself
    queued_run = make_run(alice)
    with capture(execute=True):
        run_services.cancel_run(queued_run, alice)
    assert Run.objects.get(pk=queued_run.pk).status == Status.CANCELLED
    assert not Notification.objects.exists()

    AlertSettings.objects.filter(user=alice).update(on_cancelled=True, on_succeeded=False)
    finish(capture, running())
    assert not Notification.objects.exists()
    with capture(execute=True):
        run_services.cancel_run(make_run(alice), alice)
    assert list(Notification.objects.values_list("event", flat=True)) == ["run.cancelled"]

    lost = running()
    with capture(execute=True):
        assert mark_lost(lost, "no heartbeat since")
    latest = Notification.objects.order_by("-pk").first()
    assert latest.event == "run.failed" and latest.run_id == lost.pk
    assert "worker lost" in latest.payload["run"]["error"]


def test_nothing_is_recorded_when_no_channel_is_on(
    alice, running, queued, django_capture_on_commit_callbacks, local_webhooks
):
    AlertSettings.objects.create(user=alice, webhook_url=HOOK, webhook_enabled=False)
    finish(django_capture_on_commit_callbacks, running())
    assert not Notification.objects.exists() and not queued


def test_pipeline_stages_notify_only_when_asked(
    alice, channels_on, running, queued, django_capture_on_commit_callbacks
):
    capture = django_capture_on_commit_callbacks
    pipeline = running(kind=Kind.PIPELINE, name="pipe")

    def stage(name: str) -> Run:
        return Run.objects.create(kind=Kind.BASE, owner=alice, pipeline=pipeline, name=name,
                                  status=Status.RUNNING, run_dir=str(Path(pipeline.run_dir) / name),
                                  started_at=timezone.now())  # fmt: skip

    first = stage("base")
    with capture(execute=True):
        StageFollowers(pipeline).end(first, Status.SUCCEEDED)
    assert Run.objects.get(pk=first.pk).status == Status.SUCCEEDED
    assert not Notification.objects.exists()

    AlertSettings.objects.filter(user=alice).update(include_stages=True)
    second = stage("sft")
    with capture(execute=True):
        StageFollowers(pipeline).end(second, Status.SUCCEEDED)
    finish(capture, pipeline)
    assert sorted(Notification.objects.values_list("run_id", flat=True)) == [pipeline.pk, second.pk]


# ---- threshold rules, through the worker's Follower -----------------------------------------


def follow(capture, run):
    with capture(execute=True):
        Follower(run).poll()


def test_a_threshold_fires_once_at_its_first_crossing(
    alice, channels_on, running, queued, django_capture_on_commit_callbacks
):
    capture = django_capture_on_commit_callbacks
    rule = AlertRule.objects.create(user=alice, metric="val/bpb", comparison="below", value=1.5)
    run = running()
    events = EventWriter(run.run_dir)
    events.metrics(50, {"train/loss": 3.0})
    events.eval(100, {"val/bpb": 1.8})
    events.eval(200, {"val/bpb": 1.45})
    events.eval(300, {"val/bpb": 1.2})
    follow(capture, run)

    made = Notification.objects.get()
    assert made.event == "metric.threshold" and made.rule == rule and made.run == run
    assert made.payload["step"] == 200 and made.payload["value"] == 1.45
    assert made.payload["rule"] == {"id": rule.pk, "metric": "val/bpb", "comparison": "below",
                                    "value": 1.5, "tag": ""}  # fmt: skip
    assert made.text.startswith("val/bpb went below 1.5: 1.45 at step 200 in run 'tiny run'")
    assert made.deliveries.count() == 2 and len(queued) == 2

    # Later points past the value, in a later batch, are no news.
    events.eval(400, {"val/bpb": 1.1})
    follow(capture, Run.objects.get(pk=run.pk))
    assert Notification.objects.count() == 1 and len(queued) == 2
    assert MetricPoint.objects.filter(run=run, name="val/bpb").count() == 4


def test_a_rule_watches_its_direction_metric_and_state(
    alice, channels_on, running, queued, django_capture_on_commit_callbacks
):
    capture = django_capture_on_commit_callbacks
    above = AlertRule.objects.create(user=alice, metric="train/loss", comparison="above", value=10)
    AlertRule.objects.create(user=alice, metric="train/loss", comparison="below", value=1,
                             enabled=False)  # fmt: skip
    run = running()
    events = EventWriter(run.run_dir)
    for step, loss in ((1, 3.0), (2, 0.5), (3, float("nan"))):
        events.metrics(step, {"train/loss": loss})
    follow(capture, run)
    assert not Notification.objects.exists()  # 0.5 < 1, but that rule is off

    events.metrics(4, {"train/loss": 12.5})
    follow(capture, Run.objects.get(pk=run.pk))
    made = Notification.objects.get()
    assert made.rule == above and made.payload["value"] == 12.5 and made.payload["step"] == 4


def test_a_tagged_rule_fires_only_for_runs_with_the_tag(
    alice, bob, channels_on, running, queued, django_capture_on_commit_callbacks
):
    capture = django_capture_on_commit_callbacks
    AlertRule.objects.create(user=alice, metric="val/bpb", comparison="below", value=2,
                             tag="baseline")  # fmt: skip
    AlertRule.objects.create(user=bob, metric="val/bpb", comparison="below", value=2)
    AlertSettings.objects.create(user=bob, webhook_enabled=True, webhook_url=HOOK)
    plain, tagged = running(), running()
    tagged.tags.add(Tag.objects.create(name="baseline"))
    for run in (plain, tagged):
        EventWriter(run.run_dir).eval(10, {"val/bpb": 1.5})
        follow(capture, run)
    made = Notification.objects.get()
    assert made.run == tagged and made.user == alice  # bob's rule never sees alice's runs


def test_an_alerts_failure_never_reaches_the_run(
    alice, channels_on, running, make_run, queued, monkeypatch, django_capture_on_commit_callbacks
):
    capture = django_capture_on_commit_callbacks
    AlertRule.objects.create(user=alice, metric="val/bpb", comparison="below", value=2)

    def broken(*args, **kwargs):
        raise RuntimeError("the alerts are broken")

    monkeypatch.setattr(services, "run_finished", broken)
    monkeypatch.setattr(services, "metrics_stored", broken)
    run = running()
    EventWriter(run.run_dir).eval(10, {"val/bpb": 1.5})
    follow(capture, run)
    finish(capture, Run.objects.get(pk=run.pk))
    with capture(execute=True):
        run_services.cancel_run(make_run(alice), alice)

    run.refresh_from_db()
    assert run.status == Status.SUCCEEDED and run.best_val_bpb == 1.5
    assert MetricPoint.objects.filter(run=run).count() == 1
    assert not Notification.objects.exists() and not Delivery.objects.exists()
