"""Run lifecycle rules in the services and the reconciler, without a worker."""

from __future__ import annotations

import pytest
from asgiref.sync import async_to_sync
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import AnonymousUser
from django.utils import timezone

from runs import broadcast, execution, services
from runs.models import ArtifactStatus, Checkpoint, Kind, MetricPoint, Run, Status
from runs.routing import websocket_urlpatterns
from training.flags import ConfigError

pytestmark = pytest.mark.django_db


def test_only_staff_may_register_a_server_directory(alice, staff, tmp_path):
    with pytest.raises(ConfigError) as refused:
        services.create_dataset(alice, "mine", "path", path=str(tmp_path))
    assert "staff" in refused.value.errors["source"]
    dataset = services.create_dataset(staff, "shared", "path", path=str(tmp_path))
    assert dataset.path == str(tmp_path) and dataset.status == ArtifactStatus.BUILDING
    build = dataset.runs.get()
    assert build.kind == Kind.DATASET and build.config["command"] == "stats"


def test_cancelling_a_queued_dataset_run_fails_its_dataset(alice):
    dataset = services.create_dataset(alice, "docs", "builtin", {"max_chars": 1000})
    run = dataset.runs.get()
    services.cancel_run(run, alice)
    run.refresh_from_db()
    dataset.refresh_from_db()
    assert run.status == Status.CANCELLED and run.finished_at is not None
    assert dataset.status == ArtifactStatus.FAILED


def test_resume_needs_a_checkpoint_and_drops_points_past_it(alice, make_dataset, make_tokenizer):
    dataset = make_dataset(alice)
    tokenizer = make_tokenizer(alice, dataset)
    run = services.submit_run(alice, "base", preset="tiny", dataset=dataset, tokenizer=tokenizer)
    Run.objects.filter(pk=run.pk).update(status=Status.FAILED)
    run.refresh_from_db()
    with pytest.raises(services.Conflict, match="no checkpoint"):
        services.resume_run(run, alice)

    Checkpoint.objects.create(run=run, stage="base", step=10, path=run.run_dir + "/checkpoints")
    MetricPoint.objects.bulk_create(
        MetricPoint(run=run, name="train/loss", step=s, value=1.0, time=0.0) for s in range(1, 16)
    )
    token = run.launch_token
    resumed = services.resume_run(run, alice)
    assert resumed.status == Status.QUEUED and resumed.resume_step == 10
    assert resumed.launch_token != token  # the old launch's messages are now stale
    steps = MetricPoint.objects.filter(run=run).values_list("step", flat=True)
    assert max(steps) == 10
    argv = " ".join(services.program_of(resumed).commands(resumed)[0])
    assert "--resume-from-step 10" in argv and "torch.distributed.run" in argv


def test_reconciler_fails_silent_runs_only(alice):
    old = timezone.now() - timezone.timedelta(seconds=120)
    silent = Run.objects.create(kind="base", owner=alice, status=Status.RUNNING, heartbeat_at=old)
    alive = Run.objects.create(
        kind="base", owner=alice, status=Status.RUNNING, heartbeat_at=timezone.now()
    )
    assert execution.reconcile(stale_after=30) == [silent.pk]
    silent.refresh_from_db()
    alive.refresh_from_db()
    assert silent.status == Status.FAILED and silent.error.startswith("worker lost")
    assert alive.status == Status.RUNNING


def test_a_restarted_worker_fails_the_runs_it_had(alice):
    import socket

    mine = Run.objects.create(kind="base", owner=alice, status=Status.RUNNING,
                              worker="training@x", host=socket.gethostname(),
                              heartbeat_at=timezone.now())  # fmt: skip
    other = Run.objects.create(kind="base", owner=alice, status=Status.RUNNING,
                               worker="training@y", host=socket.gethostname(),
                               heartbeat_at=timezone.now())  # fmt: skip
    assert execution.reconcile_worker_restart("training@x") == [mine.pk]
    assert Run.objects.get(pk=other.pk).status == Status.RUNNING


def _listen(user, path, run):
    async def go():
        communicator = WebsocketCommunicator(URLRouter(websocket_urlpatterns), path)
        communicator.scope["user"] = user
        connected, code = await communicator.connect(timeout=10)
        if not connected:
            await communicator.disconnect(timeout=5)
            return connected, code, None
        await communicator.send_json_to({"type": "ping"})
        assert (await communicator.receive_json_from(timeout=10))["type"] == "pong"
        from asgiref.sync import sync_to_async

        await sync_to_async(broadcast.send)(run, metrics={"train/loss": [[1, 2.5, 0.0]]})
        message = await communicator.receive_json_from(timeout=10)
        await communicator.disconnect()
        return connected, code, message

    return async_to_sync(go)()


def test_run_page_socket_gets_live_updates(alice, redis_url):
    run = Run.objects.create(kind="base", owner=alice, status=Status.RUNNING, step=1)
    connected, _, message = _listen(alice, f"/ws/runs/{run.pk}/", run)
    assert connected
    assert message["type"] == "run" and message["run"]["status"] == "running"
    assert message["metrics"] == {"train/loss": [[1, 2.5, 0.0]]}
    connected, _, message = _listen(alice, "/ws/runs/", run)
    assert message["run"]["id"] == run.pk and message["metrics"] == {}


def test_run_page_socket_refuses_anonymous(redis_url, alice):
    run = Run.objects.create(kind="base", owner=alice)
    connected, code, _ = _listen(AnonymousUser(), f"/ws/runs/{run.pk}/", run)
    assert not connected and code == 4401
