"""OpenAI-compatible routes, mounted at /v1/ (the views are in chat/openai_api.py)."""

from django.urls import path

from chat import openai_api

app_name = "openai"

urlpatterns = [
    path("models", openai_api.models, name="models"),
    path("models/<str:name>", openai_api.model_detail, name="model"),
    path("chat/completions", openai_api.chat_completions, name="chat-completions"),
]
