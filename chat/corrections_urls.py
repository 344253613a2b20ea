"""Routes of the feedback and conversation-dataset API, mounted at /api/chat/ (under /api/,
so an unknown path is a JSON 404 like the rest of the API)."""

from django.urls import path

from chat import corrections_api as api

urlpatterns = [
    path("messages/<int:message_id>/feedback/", api.FeedbackView.as_view(), name="chat-feedback"),
    path("datasets/", api.DatasetListView.as_view(), name="chat-datasets-api"),
    path("datasets/<int:dataset_id>/", api.DatasetView.as_view(), name="chat-dataset-api"),
    path(
        "datasets/<int:dataset_id>/entries/",
        api.EntryListView.as_view(),
        name="chat-dataset-entries-api",
    ),
    path(
        "datasets/<int:dataset_id>/entries/<int:entry_id>/",
        api.EntryView.as_view(),
        name="chat-dataset-entry-api",
    ),
    path("datasets/<int:dataset_id>/collect/", api.CollectView.as_view(), name="chat-collect-api"),
    path("datasets/<int:dataset_id>/export/", api.ExportView.as_view(), name="chat-export-api"),
    path(
        "datasets/<int:dataset_id>/finetune/", api.FinetuneView.as_view(), name="chat-finetune-api"
    ),
]
