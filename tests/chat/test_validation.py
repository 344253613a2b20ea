"""Bad frames get field-level error frames, nothing is saved, and the socket keeps working."""

import pytest

from chat.models import Conversation, Message
from tests.chat.conftest import frames_until, open_socket, run

pytestmark = pytest.mark.django_db(transaction=True)


def send(model, **fields) -> dict:
    return {"type": "send", "conversation": None, "checkpoint": model.pk,
            "content": "Hi!", "max_tokens": 3, **fields}  # fmt: skip


BAD_FRAMES = [
    (lambda c: send(c, temperature=2.5), "temperature"),
    (lambda c: send(c, temperature=-0.1), "temperature"),
    (lambda c: send(c, temperature="hot"), "temperature"),
    (lambda c: send(c, top_k=201), "top_k"),
    (lambda c: send(c, top_k=-1), "top_k"),
    (lambda c: send(c, top_k=2.5), "top_k"),
    (lambda c: send(c, max_tokens=0), "max_tokens"),
    (lambda c: send(c, max_tokens=4097), "max_tokens"),
    (lambda c: send(c, max_tokens=True), "max_tokens"),
    (lambda c: send(c, content="x" * 8001), "content"),
    (lambda c: send(c, content="   "), "content"),
    (lambda c: send(c, content=None), "content"),
    (lambda c: send(c, checkpoint=None), "checkpoint"),
    (lambda c: send(c, checkpoint=c.pk + 1000), "checkpoint"),
    (lambda c: send(c, conversation="1"), "conversation"),
    (lambda c: send(c, conversation=999999), "conversation"),
    (lambda c: {"type": "regenerate"}, "conversation"),
    (lambda c: {"type": "edit", "conversation": 1, "content": "x"}, "message"),
    (lambda c: {"type": "dance"}, "type"),
    (lambda c: ["not", "an", "object"], None),
]


def test_every_bad_frame_names_its_field_and_the_socket_still_works(alice, checkpoint, engine):
    async def body():
        socket = await open_socket(alice)
        errors = []
        for make, _ in BAD_FRAMES:
            await socket.send_json_to(make(checkpoint))
            errors.append(await socket.receive_json_from(timeout=10))
        await socket.send_to(text_data="{not json")
        errors.append(await socket.receive_json_from(timeout=10))
        await socket.send_json_to(send(checkpoint))
        good = await frames_until(socket, "done", "error")
        await socket.disconnect()
        return errors, good

    errors, good = run(body)
    expected = [field for _, field in BAD_FRAMES] + [None]
    assert [e["type"] for e in errors] == ["error"] * len(expected)
    assert [e["field"] for e in errors] == expected
    assert all(e["message"] for e in errors)
    assert "8000" in errors[9]["message"]
    assert good[-1]["type"] == "done"
    assert Conversation.objects.count() == 1 and Message.objects.count() == 2


def test_conversation_limits(alice, checkpoint, engine, settings):
    settings.CHAT_LIMITS = {**settings.CHAT_LIMITS, "max_messages": 3, "max_total_chars": 50}
    conversation = Conversation.objects.create(owner=alice)
    conversation.messages.create(role="user", content="a" * 20)
    conversation.messages.create(role="assistant", content="b" * 20)

    async def body():
        socket = await open_socket(alice)
        frames = []
        for content in ["c" * 11, "c" * 10]:
            await socket.send_json_to(
                send(checkpoint, conversation=conversation.pk, content=content)
            )
            frames.append(await frames_until(socket, "done", "error"))
        await socket.send_json_to(send(checkpoint, conversation=conversation.pk))
        frames.append(await frames_until(socket, "done", "error"))
        await socket.disconnect()
        return frames

    too_long, fits, too_many = run(body)
    assert too_long[-1]["field"] == "content" and "50" in too_long[-1]["message"]
    assert fits[-1]["type"] == "done"
    assert too_many[-1]["field"] == "conversation" and "3 messages" in too_many[-1]["message"]
    assert conversation.messages.count() == 4


def test_one_reply_at_a_time(alice, checkpoint, engine):
    async def body():
        socket = await open_socket(alice)
        await socket.send_json_to(send(checkpoint, max_tokens=4096))
        await frames_until(socket, "token")
        await socket.send_json_to(send(checkpoint))
        busy = await frames_until(socket, "error")
        await socket.send_json_to({"type": "stop"})
        done = await frames_until(socket, "done")
        await socket.disconnect()
        return busy[-1], done[-1]

    busy, done = run(body)
    assert busy["field"] == "type" and "stop it first" in busy["message"]
    assert done["finish_reason"] == "stopped"
