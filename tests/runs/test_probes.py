"""Probe prompts: bounded at submission and on the run page; a probe nobody can answer is
recorded with its reason and shown. (Answers by a real engine worker for a real run's
checkpoints: tests/runs/test_live_runs.py.)"""

from __future__ import annotations

import uuid

import pytest
from django.urls import reverse
from rest_framework.test import APIClient

from chat import probes as chat_probes
from runs import probes
from runs.models import Checkpoint, ProbeAnswer, Run
from training.flags import ConfigError

pytestmark = pytest.mark.django_db


@pytest.fixture
def alice(django_user_model):
    return django_user_model.objects.create_user("alice", password="pw")


def test_prompts_are_bounded():
    assert probes.clean_prompts(" Hello \n\n  Once upon a time") == ["Hello", "Once upon a time"]
    assert probes.clean_prompts(None) == []
    for bad in (["x"] * 9, ["x" * 501], [1], "x\x00"):
        with pytest.raises(ConfigError) as caught:
            probes.clean_prompts(bad)
        assert "probe_prompts" in caught.value.errors
    with pytest.raises(ConfigError):
        probes.clean_prompts(["hi"], "tokenizer")


def test_the_api_refuses_more_than_eight_prompts(alice):
    api = APIClient()
    api.force_authenticate(alice)
    body = {"kind": "base", "preset": "tiny", "probe_prompts": ["hi"] * 9}
    response = api.post("/api/runs/", body, format="json")
    assert response.status_code == 400 and "probe_prompts" in response.content.decode()


def test_the_owner_sets_the_prompts_on_the_run_page(client, alice, django_user_model):
    run = Run.objects.create(kind="base", owner=alice, status="running")
    url = reverse("run-probes", args=[run.pk])
    bob = django_user_model.objects.create_user("bob", password="pw")
    client.force_login(bob)
    client.post(url, {"probe_prompts": "Not yours"})
    run.refresh_from_db()
    assert run.probe_prompts == []
    client.force_login(alice)
    assert 'id="probe-prompts"' in client.get(reverse("run-detail", args=[run.pk])).content.decode()
    client.post(url, {"probe_prompts": "The capital of France is\nOnce upon a time"})
    run.refresh_from_db()
    assert run.probe_prompts == ["The capital of France is", "Once upon a time"]
    client.post(url, {"probe_prompts": "\n".join(["x"] * 9)})
    run.refresh_from_db()
    assert len(run.probe_prompts) == 2


@pytest.mark.django_db(transaction=True)
def test_no_engine_worker_is_recorded_and_shown(client, alice, redis_url, settings, tmp_path):
    settings.CHAT_ENGINE_CHANNEL = f"engine-nobody-{uuid.uuid4().hex[:8]}"
    settings.CHAT_ENGINE_ACCEPT_TIMEOUT = 0.5
    run = Run.objects.create(kind="sft", owner=alice, status="running", probe_prompts=["Hi"])
    checkpoint = Checkpoint.objects.create(run=run, stage="sft", step=7, path=str(tmp_path))
    assert chat_probes.answer(checkpoint.pk) == 0
    (row,) = ProbeAnswer.objects.filter(checkpoint=checkpoint)
    assert (row.step, row.index, row.prompt, row.text) == (7, 0, "Hi", "") and row.error
    client.force_login(alice)
    page = client.get(reverse("run-detail", args=[run.pk])).content.decode()
    assert 'id="probes-panel"' in page and "no answer: " in page
