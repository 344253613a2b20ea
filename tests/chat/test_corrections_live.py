"""The one-button fine-tune on corrections, executed for real: a Celery worker process runs the
SFT program from the chatted checkpoint, with the exported corrections in its mixture."""

from __future__ import annotations

import pytest

from chat import corrections
from chat.models import Conversation
from chat.services import chat_limits
from runs.models import Run, Status
from tests.runs.live_workers import LiveWorker, wait_for

pytestmark = [pytest.mark.services, pytest.mark.timeout(240),
              pytest.mark.django_db(transaction=True)]  # fmt: skip


@pytest.fixture
def training_worker(redis_url, tmp_path):
    worker = LiveWorker("training", tmp_path)
    yield worker
    worker.stop()


def test_fine_tune_on_my_corrections_runs_sft_from_the_chatted_checkpoint(
    client, alice, checkpoint, training_worker
):
    conversation = Conversation.objects.create(owner=alice, checkpoint=checkpoint)
    conversation.messages.create(role="user", content="What is 2+3*4?")
    reply = conversation.messages.create(role="assistant", content="It is 20.")
    corrections.give_feedback(alice, reply.pk, correction="It is 14.", lim=chat_limits())
    client.force_login(alice)

    response = client.post(
        "/chat/finetune-corrections/", {"checkpoint": checkpoint.pk, "preset": "tiny"}
    )

    run = Run.objects.get(kind="sft")
    assert response.status_code == 302 and response["Location"] == f"/runs/{run.pk}/"
    assert run.parent_checkpoint == checkpoint
    export = run.config["mixture"].split(",")[0]
    assert export.startswith("customjson:") and export.endswith("*3")

    def finished():
        run.refresh_from_db()
        return run.status in (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED)

    info = lambda: f"{run.status} {run.error}\n{run.log_tail}\n{training_worker.log()}"  # noqa: E731
    wait_for(finished, 180, f"run {run.pk} to finish", info=info)
    assert run.status == Status.SUCCEEDED, info()
    # The program itself recorded the mixture with the export in it, and saved an SFT model.
    start = run.events.get(type="start")
    assert start.data["config"]["mixture"] == run.config["mixture"]
    assert run.checkpoints.get().stage == "sft"
