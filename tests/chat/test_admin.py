"""Admin pages for conversations and messages: lists, search, filters and detail."""

import pytest

from chat.models import Conversation

pytestmark = pytest.mark.django_db


@pytest.fixture
def conversation(alice):
    conversation = Conversation.objects.create(owner=alice, title="about foxes")
    conversation.messages.create(role="user", content="What does the fox say?")
    conversation.messages.create(
        role="assistant", content="Nobody knows.", finish_reason="stop", completion_tokens=4
    )
    return conversation


@pytest.mark.parametrize(
    "url",
    [
        "/admin/chat/conversation/",
        "/admin/chat/conversation/?q=fox",
        "/admin/chat/conversation/?checkpoint__stage=sft",
        "/admin/chat/message/",
        "/admin/chat/message/?q=Nobody&role=assistant",
        "/admin/chat/message/?finish_reason=stop",
    ],
)
def test_lists_search_and_filters(client, admin_user, conversation, url):
    client.force_login(admin_user)
    response = client.get(url)
    assert response.status_code == 200


def test_conversation_page_shows_its_messages(client, admin_user, conversation):
    client.force_login(admin_user)
    response = client.get(f"/admin/chat/conversation/{conversation.pk}/change/")
    assert response.status_code == 200
    assert b"What does the fox say?" in response.content
    search = client.get("/admin/chat/conversation/?q=Nobody")
    assert b"about foxes" in search.content
    assert b"about foxes" not in client.get("/admin/chat/conversation/?q=wolves").content
