"""Regenerate replaces the last reply; edit rewrites a user message and cuts the talk there."""

import pytest

from chat.models import Conversation, Message
from tests.chat.conftest import frames_until, open_socket, run

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def conversation(alice, checkpoint):
    """Two finished exchanges, as earlier replies would have left them."""
    conversation = Conversation.objects.create(
        owner=alice, title="maths", checkpoint=checkpoint, checkpoint_step=checkpoint.step
    )
    for question, answer in [("What is 2+3?", "5"), ("And 12*34?", "408")]:
        conversation.messages.create(role="user", content=question)
        conversation.messages.create(role="assistant", content=answer, finish_reason="stop")
    return conversation


def talk(user, frame: dict) -> list[dict]:
    async def body():
        socket = await open_socket(user)
        await socket.send_json_to(frame)
        frames = await frames_until(socket, "done", "error")
        await socket.disconnect()
        return frames

    return run(body)


def test_regenerate_replaces_the_last_reply(alice, conversation, engine):
    before = list(conversation.messages.all())
    frames = talk(alice, {"type": "regenerate", "conversation": conversation.pk, "max_tokens": 6})
    started, done = frames[0], frames[-1]
    assert done["type"] == "done", done
    assert started["message"] == before[2].pk  # the reply answers the last question
    after = list(conversation.messages.all())
    assert [m.pk for m in after[:3]] == [m.pk for m in before[:3]]
    assert after[3].pk == done["message"] != before[3].pk
    assert after[3].completion_tokens == 6 and after[3].content == done["content"]
    assert not Message.objects.filter(pk=before[3].pk).exists()


def test_edit_rewrites_the_message_drops_what_followed_and_replies(alice, conversation, engine):
    first_question = conversation.messages.first()
    frames = talk(
        alice,
        {"type": "edit", "conversation": conversation.pk, "message": first_question.pk,
         "content": "What is 3+4?", "max_tokens": 4},
    )  # fmt: skip
    assert frames[-1]["type"] == "done", frames[-1]
    question, reply = conversation.messages.all()
    assert question.pk == first_question.pk and question.content == "What is 3+4?"
    assert reply.pk == frames[-1]["message"] and reply.role == "assistant"
    # The prompt held only the edited question.
    assert reply.prompt_tokens < 30


def test_an_assistant_message_cannot_be_edited(alice, conversation, engine):
    reply = conversation.messages.last()
    frames = talk(
        alice,
        {"type": "edit", "conversation": conversation.pk, "message": reply.pk, "content": "x"},
    )
    assert frames[-1] == {
        "type": "error", "field": "message",
        "message": "no such user message in this conversation",
    }  # fmt: skip
    assert conversation.messages.count() == 4


def test_a_failed_edit_changes_nothing(alice, conversation, engine, tmp_path):
    from runs.models import Checkpoint

    broken = Checkpoint.objects.create(stage="sft", step=1, path=str(tmp_path / "gone"))
    first_question = conversation.messages.first()
    frames = talk(
        alice,
        {"type": "edit", "conversation": conversation.pk, "message": first_question.pk,
         "content": "changed", "checkpoint": broken.pk},
    )  # fmt: skip
    assert frames[-1]["type"] == "error" and "cannot load" in frames[-1]["message"]
    assert [m.content for m in conversation.messages.all()] == ["What is 2+3?", "5", "And 12*34?",
                                                               "408"]  # fmt: skip
