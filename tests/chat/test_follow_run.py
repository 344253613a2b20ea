"""Following a run: each message is answered by the run's newest checkpoint at that moment."""

import pytest
from channels.db import database_sync_to_async
from django.urls import reverse

from chat.models import Message
from tests.chat.conftest import STEP, frames_until, open_socket, run

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_checkpoint_saved_between_two_messages_answers_the_second(alice, followed_run, engine):
    first_checkpoint = followed_run.run.checkpoints.get()
    later = {}

    async def body():
        socket = await open_socket(alice)
        send = {"type": "send", "run": followed_run.run.pk, "max_tokens": 4}
        await socket.send_json_to({**send, "conversation": None, "content": "Hello!"})
        first = await frames_until(socket, "done", "error")
        later["checkpoint"] = await database_sync_to_async(followed_run.save)(STEP + 10)
        conversation = first[0]["conversation"]
        await socket.send_json_to({**send, "conversation": conversation, "content": "And now?"})
        second = await frames_until(socket, "done", "error")
        await socket.disconnect()
        return first, second

    first, second = run(body)
    assert first[-1]["type"] == second[-1]["type"] == "done", second[-1]
    assert (first[0]["checkpoint"], first[0]["step"]) == (first_checkpoint.pk, STEP)
    assert (first[-1]["checkpoint"], first[-1]["step"]) == (first_checkpoint.pk, STEP)
    assert (second[-1]["checkpoint"], second[-1]["step"]) == (later["checkpoint"].pk, STEP + 10)
    replies = Message.objects.filter(role="assistant").order_by("id")
    assert [(m.checkpoint_id, m.checkpoint_step) for m in replies] == [
        (first_checkpoint.pk, STEP), (later["checkpoint"].pk, STEP + 10)
    ]  # fmt: skip


def test_following_a_run_without_checkpoints_is_a_field_error(alice, django_user_model):
    from runs.models import Run

    empty = Run.objects.create(kind="sft", owner=alice, status="queued")

    async def body():
        socket = await open_socket(alice)
        await socket.send_json_to({"type": "send", "run": empty.pk, "content": "hi"})
        frames = await frames_until(socket, "error")
        await socket.disconnect()
        return frames

    (error,) = run(body)
    assert error["field"] == "run" and "no checkpoint" in error["message"]


def test_the_picker_offers_to_follow_each_run_with_a_checkpoint(client, alice, followed_run):
    newest = followed_run.save(STEP + 10)
    client.force_login(alice)
    response = client.get(reverse("chat-page"))
    assert response.status_code == 200
    page = response.content.decode()
    assert f'value="run-{followed_run.run.pk}"' in page
    assert f"follow run #{followed_run.run.pk} · " in page
    # The entry's card is its newest checkpoint's, lineage link included.
    assert reverse("checkpoint-lineage", args=[newest.pk]) in page
