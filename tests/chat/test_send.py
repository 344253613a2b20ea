"""Sending a message: the reply streams from a real engine worker and is saved."""

import pytest

from chat.models import Conversation, Message
from tests.chat.conftest import frames_until, open_socket, run

pytestmark = pytest.mark.django_db(transaction=True)


def test_reply_streams_in_several_chunks_and_is_saved(alice, checkpoint, engine):
    async def body():
        socket = await open_socket(alice)
        await socket.send_json_to(
            {"type": "send", "conversation": None, "checkpoint": checkpoint.pk,
             "content": "Hello! How are you?", "max_tokens": 200}
        )  # fmt: skip
        frames = await frames_until(socket, "done", "error")
        await socket.disconnect()
        return frames

    frames = run(body)
    started, *tokens, done = frames
    assert started["type"] == "started"
    assert done["type"] == "done", done
    assert len(tokens) >= 2 and {t["type"] for t in tokens} == {"token"}
    assert {t["part"] for t in tokens} == {"text"}
    streamed = "".join(t["text"] for t in tokens)

    conversation = Conversation.objects.get(pk=started["conversation"])
    assert conversation.owner == alice
    assert conversation.title == "Hello! How are you?"
    assert conversation.checkpoint == checkpoint and conversation.checkpoint_step == 5
    user, reply = conversation.messages.all()
    assert (user.pk, user.role, user.content) == (started["message"], "user", "Hello! How are you?")
    assert reply.pk == done["message"] and reply.role == Message.Role.ASSISTANT
    assert reply.content == streamed == done["content"] and streamed
    assert reply.finish_reason == done["finish_reason"] == "length"
    assert reply.completion_tokens == done["completion_tokens"] == 200
    assert reply.prompt_tokens == done["prompt_tokens"] > 5
    assert reply.time_to_first_token >= 0 and reply.tokens_per_second > 0
    assert reply.sampling["max_tokens"] == 200
    assert reply.sampling["temperature"] == 0.8 and reply.sampling["top_k"] == 50
    assert isinstance(reply.sampling["seed"], int)


def test_a_follow_up_continues_the_conversation_with_a_fresh_seed(alice, checkpoint, engine):
    async def body():
        socket = await open_socket(alice)
        send = {"type": "send", "checkpoint": checkpoint.pk, "max_tokens": 8}
        await socket.send_json_to({**send, "conversation": None, "content": "What is 12*34?"})
        first = await frames_until(socket, "done", "error")
        conversation = first[0]["conversation"]
        await socket.send_json_to({**send, "conversation": conversation, "content": "And 2+3?"})
        second = await frames_until(socket, "done", "error")
        await socket.disconnect()
        return first, second

    first, second = run(body)
    assert first[-1]["type"] == second[-1]["type"] == "done"
    assert second[0]["conversation"] == first[0]["conversation"]
    # The second prompt holds the first exchange too.
    assert second[-1]["prompt_tokens"] > first[-1]["prompt_tokens"] + 8
    messages = Message.objects.filter(conversation_id=first[0]["conversation"])
    assert [m.role for m in messages] == ["user", "assistant", "user", "assistant"]
    seeds = [m.sampling["seed"] for m in messages if m.role == "assistant"]
    assert seeds[0] != seeds[1]


def test_engine_failure_is_an_error_frame_and_leaves_nothing_behind(alice, engine, tmp_path):
    from runs.models import Checkpoint

    missing = Checkpoint.objects.create(stage="sft", step=1, path=str(tmp_path / "nowhere"))

    async def body():
        socket = await open_socket(alice)
        await socket.send_json_to(
            {"type": "send", "checkpoint": missing.pk, "content": "hi", "max_tokens": 4}
        )
        frames = await frames_until(socket, "done", "error")
        await socket.disconnect()
        return frames

    started, error = run(body)
    assert error["type"] == "error" and error["field"] is None
    assert "cannot load checkpoint" in error["message"]
    assert not Conversation.objects.filter(pk=started["conversation"]).exists()
    assert not Message.objects.exists()
