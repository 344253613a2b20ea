"""Who may use the chat socket, and whose conversations: anonymous users are refused, and
another user's conversation looks exactly like one that does not exist."""

import pytest
from django.contrib.auth.models import AnonymousUser

from chat.models import Conversation
from tests.chat.conftest import open_socket, run

pytestmark = pytest.mark.django_db(transaction=True)


def test_anonymous_users_are_refused(redis_url):
    async def body():
        from channels.routing import URLRouter
        from channels.testing import WebsocketCommunicator

        from nanochat_site.routing import websocket_urlpatterns

        socket = WebsocketCommunicator(URLRouter(websocket_urlpatterns), "/ws/chat/")
        socket.scope["user"] = AnonymousUser()
        result = await socket.connect(timeout=10)
        # Let the refused consumer finish (or cancel it) before the loop closes.
        await socket.disconnect(timeout=5)
        return result

    connected, code = run(body)
    assert not connected and code == 4401


def test_another_users_conversation_is_refused_like_a_missing_one(
    alice, bob, checkpoint, redis_url
):
    theirs = Conversation.objects.create(owner=alice, title="alice's secrets")
    question = theirs.messages.create(role="user", content="my secret")
    theirs.messages.create(role="assistant", content="kept")
    missing = theirs.pk + 1000

    def frames_for(conversation_id: int) -> list[dict]:
        return [
            {"type": "send", "conversation": conversation_id, "checkpoint": checkpoint.pk,
             "content": "let me in"},
            {"type": "regenerate", "conversation": conversation_id, "checkpoint": checkpoint.pk},
            {"type": "edit", "conversation": conversation_id, "message": question.pk,
             "content": "changed", "checkpoint": checkpoint.pk},
        ]  # fmt: skip

    async def body():
        socket = await open_socket(bob)
        answers = []
        for conversation_id in (theirs.pk, missing):
            for frame in frames_for(conversation_id):
                await socket.send_json_to(frame)
                answers.append(await socket.receive_json_from(timeout=10))
        await socket.disconnect()
        return answers

    answers = run(body)
    for_theirs, for_missing = answers[:3], answers[3:]
    assert for_theirs == for_missing
    assert all(a == {"type": "error", "field": "conversation", "message": "no such conversation"}
               for a in answers)  # fmt: skip
    assert [m.content for m in theirs.messages.all()] == ["my secret", "kept"]
    assert not Conversation.objects.filter(owner=bob).exists()
