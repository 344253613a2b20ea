"""The chat page's routes, mounted at /chat/ next to chat/urls.py.

The page lives at /chat/ (a new conversation) and /chat/<id>/ (an existing one); its script
reads JSON from /chat/api/conversations/ (the list) and /chat/api/conversations/<id>/.
The conversation datasets (chat/corrections_pages.py) live at /chat/datasets/.
"""

from django.urls import path

from chat import corrections_pages, pages

urlpatterns = [
    path("", pages.chat_page, name="chat-page"),
    path("<int:conversation_id>/", pages.chat_page, name="chat-conversation"),
    path("api/conversations/", pages.conversations_json, name="chat-conversations-json"),
    path(
        "api/conversations/<int:conversation_id>/",
        pages.conversation_json,
        name="chat-conversation-json",
    ),
    path("datasets/", corrections_pages.datasets_page, name="chat-datasets"),
    path("datasets/<int:dataset_id>/", corrections_pages.dataset_page, name="chat-dataset"),
    path(
        "datasets/<int:dataset_id>/export/",
        corrections_pages.export_page,
        name="chat-dataset-export",
    ),
    path(
        "datasets/<int:dataset_id>/entries/<int:entry_id>/",
        corrections_pages.entry_page,
        name="chat-dataset-entry",
    ),
    path(
        "datasets/<int:dataset_id>/<str:action>/",
        corrections_pages.dataset_action,
        name="chat-dataset-action",
    ),
    path(
        "finetune-corrections/",
        corrections_pages.finetune_corrections,
        name="chat-finetune-corrections",
    ),
]
