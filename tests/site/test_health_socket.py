"""The health websocket consumer over the real Redis channel layer (in-process)."""

import pytest
from asgiref.sync import async_to_sync
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import AnonymousUser

from nanochat_site.consumers import HealthConsumer


def _talk(user, messages):
    """Connect as `user`, send each message, collect one reply per message."""

    async def run():
        communicator = WebsocketCommunicator(HealthConsumer.as_asgi(), "/ws/health/")
        communicator.scope["user"] = user
        connected, code = await communicator.connect()
        replies = []
        if connected:
            for message in messages:
                await communicator.send_json_to(message)
                replies.append(await communicator.receive_json_from(timeout=10))
            await communicator.disconnect()
        return connected, code, replies

    return async_to_sync(run)()


@pytest.mark.django_db
def test_ping_comes_back_through_redis(admin_user, redis_url):
    connected, _, replies = _talk(
        admin_user, [{"type": "ping", "id": 7}, {"type": "ping", "id": 8}]
    )
    assert connected
    assert [r["id"] for r in replies] == [7, 8]
    assert all(r["type"] == "pong" and r["layer_ms"] >= 0 for r in replies)


@pytest.mark.django_db
def test_unknown_messages_get_an_error_and_the_socket_stays_open(admin_user, redis_url):
    connected, _, replies = _talk(admin_user, [{"type": "nonsense"}, {"type": "ping", "id": 1}])
    assert replies[0] == {"type": "error", "error": 'expected {"type": "ping"}'}
    assert replies[1]["type"] == "pong"


def test_anonymous_users_are_refused(redis_url):
    connected, code, _ = _talk(AnonymousUser(), [])
    assert not connected
    assert code == 4401
