"""OpenAI-compatible routes, mounted at /v1/ (the views are in chat/openai_api.py).

A wrong method on a known path is a JSON 405 (chat/openai_api.py `api_view`).
"""

from django.urls import path, re_path

from chat import openai_api

app_name = "openai"

urlpatterns = [
    path("models", openai_api.models, name="models"),
    path("models/<str:name>", openai_api.model_detail, name="model"),
    path("chat/completions", openai_api.chat_completions, name="chat-completions"),
    path("completions", openai_api.completions, name="completions"),
    # Anything else: OpenAI's JSON error shape (404), never Django's HTML page.
    re_path(r"^(?P<rest>.*)$", openai_api.unknown, name="unknown"),
]
