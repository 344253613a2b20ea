"""Shared fixtures for the runs tests: users, API clients, ready inputs and a finished run.

Rows are created directly in the database (no worker, no training program), shaped the way
runs/ingest.py leaves them, so API and page tests read realistic data in milliseconds.
"""

from __future__ import annotations

import pytest
from django.utils import timezone
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from runs.models import (
    ArtifactStatus,
    Checkpoint,
    Dataset,
    Kind,
    MetricPoint,
    Report,
    Run,
    RunEvent,
    Sample,
    Status,
    Tokenizer,
)
from runs.programs import PROGRAMS
from runs.services import data_home

PASSWORD = "pw-for-tests"
LOSS_POINTS = 1000  # train/loss points of the finished run: more than a chart draws


@pytest.fixture
def alice(django_user_model):
    return django_user_model.objects.create_user("alice", password=PASSWORD)


@pytest.fixture
def bob(django_user_model):
    return django_user_model.objects.create_user("bob", password=PASSWORD)


@pytest.fixture
def staff(django_user_model):
    return django_user_model.objects.create_user("staff", password=PASSWORD, is_staff=True)


@pytest.fixture
def api():
    """api(user) -> an APIClient signed in by session (token=True: by token header)."""

    def make(user=None, token: bool = False) -> APIClient:
        client = APIClient()
        if user is not None and token:
            key = Token.objects.get_or_create(user=user)[0].key
            client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
        elif user is not None:
            client.force_login(user)
        return client

    return make


@pytest.fixture
def make_dataset():
    def make(owner, name: str = "corpus", status: str = ArtifactStatus.READY, **fields):
        return Dataset.objects.create(
            name=name, owner=owner, source=Dataset.Source.BUILTIN, status=status,
            path=str(data_home() / "datasets" / name), **fields,
        )  # fmt: skip

    return make


@pytest.fixture
def make_tokenizer():
    def make(owner, dataset, name: str = "tok512", status: str = ArtifactStatus.READY):
        return Tokenizer.objects.create(
            name=name, owner=owner, dataset=dataset, status=status, vocab_size=512,
            path=str(data_home() / "tokenizers" / name),
        )  # fmt: skip

    return make


@pytest.fixture
def ready_dataset(alice, make_dataset):
    return make_dataset(alice)


@pytest.fixture
def ready_tokenizer(alice, ready_dataset, make_tokenizer):
    return make_tokenizer(alice, ready_dataset)


@pytest.fixture
def make_run(ready_dataset, ready_tokenizer, tmp_path):
    """make_run(owner, status=...) -> a base run on the ready inputs, with its own directory.

    The directory is under the test's tmp_path: primary keys repeat between tests (SQLite
    reuses them after a rollback), so directories under the shared data home would too.
    """

    def make(owner, status: str = Status.QUEUED, **fields) -> Run:
        fields = {
            "kind": Kind.BASE, "preset": "tiny", "config": PROGRAMS["base"].validate("tiny", {}),
            "dataset": ready_dataset, "tokenizer": ready_tokenizer, "name": "tiny run",
            **fields,
        }  # fmt: skip
        if status != Status.QUEUED:
            fields.setdefault("started_at", timezone.now())
        if status in (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED):
            fields.setdefault("finished_at", timezone.now())
        run = Run.objects.create(owner=owner, status=status, **fields)
        run.run_dir = str(tmp_path / "runs" / f"run-{run.pk:06d}")
        run.save(update_fields=["run_dir"])
        return run

    return make


def add_checkpoint(run: Run, step: int) -> Checkpoint:
    return Checkpoint.objects.create(
        run=run, tokenizer=run.tokenizer, stage=Checkpoint.Stage.BASE, step=step,
        path=str(run.directory / "checkpoints"), model_config={"n_layer": 2}, val_bpb=2.5,
    )  # fmt: skip


@pytest.fixture
def finished_run(alice, make_run):
    """alice's succeeded base run: 1000 loss points, evals, events, samples, report, 2 checkpoints."""
    run = make_run(alice, Status.SUCCEEDED, step=LOSS_POINTS - 1, total_steps=LOSS_POINTS,
                   progress=1.0, exit_code=0, best_val_bpb=2.4)  # fmt: skip
    t0 = 1_700_000_000.0
    points = [
        MetricPoint(run=run, name="train/loss", step=i, value=5.0 - i / 400, time=t0 + i)
        for i in range(LOSS_POINTS)
    ]
    points += [
        MetricPoint(run=run, name="val/bpb", step=i, value=3.0 - i / 1000, time=t0 + i)
        for i in range(0, LOSS_POINTS, 100)
    ]
    MetricPoint.objects.bulk_create(points)
    events = [("start", None), ("metrics", 0), ("checkpoint", 500), ("metrics", 1)]
    events += [("checkpoint", 999), ("end", None)]
    RunEvent.objects.bulk_create(
        [RunEvent(run=run, seq=i, type=t, time=t0 + i, step=step, data={"n": i})
         for i, (t, step) in enumerate(events)]
    )  # fmt: skip
    run.events_count = len(events)
    run.save(update_fields=["events_count"])
    add_checkpoint(run, 500)
    add_checkpoint(run, 999)
    Sample.objects.create(run=run, step=999, prompt="The capital of France is", completion=" x")
    Report.objects.create(run=run, section="Training", markdown="## Training\nloss went down")
    Report.objects.create(run=run, section="Evaluation", markdown="## Evaluation\nbpb 2.4")
    return run
