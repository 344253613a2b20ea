"""The chat page's routes, mounted at /chat/ next to chat/urls.py.

The page lives at /chat/ (a new conversation) and /chat/<id>/ (an existing one); its script
reads JSON from /chat/api/conversations/ (the list) and /chat/api/conversations/<id>/.
"""

from django.urls import path

from chat import pages

urlpatterns = [
    path("", pages.chat_page, name="chat-page"),
    path("<int:conversation_id>/", pages.chat_page, name="chat-conversation"),
    path("api/conversations/", pages.conversations_json, name="chat-conversations-json"),
    path(
        "api/conversations/<int:conversation_id>/",
        pages.conversation_json,
        name="chat-conversation-json",
    ),
]
