"""Stopping a reply: the stop frame and a closed socket both end it early and keep the text."""

import pytest

from chat.models import Message
from tests.chat.conftest import frames_until, open_socket, run

pytestmark = pytest.mark.django_db(transaction=True)

LONG = 4096  # far more than a stop lets through


def long_send(checkpoint) -> dict:
    return {"type": "send", "checkpoint": checkpoint.pk, "content": "Tell me a long story.",
            "max_tokens": LONG}  # fmt: skip


def test_stop_ends_the_reply_early_and_saves_the_partial_text(alice, checkpoint, engine):
    async def body():
        socket = await open_socket(alice)
        await socket.send_json_to(long_send(checkpoint))
        before = await frames_until(socket, "token")
        await socket.send_json_to({"type": "stop"})
        after = await frames_until(socket, "done", "error")
        # The socket serves the next message as usual.
        await socket.send_json_to(
            {"type": "send", "conversation": before[0]["conversation"],
             "checkpoint": checkpoint.pk, "content": "Go on.", "max_tokens": 3}
        )  # fmt: skip
        again = await frames_until(socket, "done", "error")
        await socket.disconnect()
        return before + after, again

    frames, again = run(body)
    done = frames[-1]
    assert done["type"] == "done", done
    assert done["finish_reason"] == "stopped"
    assert 1 <= done["completion_tokens"] < LONG
    streamed = "".join(f["text"] for f in frames if f["type"] == "token")
    reply = Message.objects.get(pk=done["message"])
    assert reply.finish_reason == Message.Finish.STOPPED
    assert reply.content == streamed == done["content"]
    assert again[-1]["type"] == "done" and again[-1]["finish_reason"] == "length"


def test_closing_the_socket_stops_the_reply(alice, checkpoint, engine):
    async def body():
        socket = await open_socket(alice)
        await socket.send_json_to(long_send(checkpoint))
        frames = await frames_until(socket, "token")
        # The consumer waits (briefly) for the stopped reply and saves it before closing.
        await socket.disconnect(timeout=15)
        return frames

    started = run(body)[0]
    user, reply = Message.objects.filter(conversation_id=started["conversation"])
    assert user.pk == started["message"]
    assert reply.finish_reason == Message.Finish.STOPPED
    assert 1 <= reply.completion_tokens < LONG
    # The worker has let go of the row.
    engine.wait_until(lambda: engine.stats()["active_rows"] == 0, 10, "the row to be freed")
