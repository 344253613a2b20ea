"""The chat page, and the two small JSON reads its script needs.

The page holds no chat logic. It lists the user's conversations, offers the checkpoints to
chat with (one label style, and a card per checkpoint saying what the model is: see
chat/checkpoints.py), and hands the browser the opened conversation, the checkpoints and the limits as
JSON (`json_script`); everything after that travels over the /ws/chat/ socket
(chat/consumers.py), driven by static/js/chat.js. The JSON reads let the script refresh the
conversation list once a first message has created a conversation, and re-read a
conversation after the socket dropped mid-reply (the server saved what was generated).

Another user's conversation is a 404, exactly like a missing one.
"""

from __future__ import annotations

from dataclasses import asdict
from functools import wraps

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, JsonResponse
from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.http import require_GET

from chat import checkpoints, corrections, services
from chat.models import Conversation, Message
from nanochat_site import limits
from runs import selectors

# The sidebar shows this many of the most recently used conversations.
CONVERSATIONS_SHOWN = 200


def _checkpoint_param(request) -> int | None:
    """`?checkpoint=<id>` to preselect; a value that is not an id is ignored, with a message."""
    try:
        return limits.query_int(request.GET, "checkpoint", lo=1)
    except limits.QueryParamError as exc:
        messages.warning(request, f"Ignored the checkpoint parameter: it {exc.message}.")
        return None


@login_required
@require_GET
def chat_page(request, conversation_id: int | None = None):
    conversation = None
    if conversation_id is not None:
        conversation = _own_conversation(request.user, conversation_id)
    options = picker_options()
    ids = {option["id"] for option in options}
    selected = conversation.checkpoint_id if conversation else None
    if selected is None:
        selected = _checkpoint_param(request)  # "chat" buttons of the dashboard
    if selected not in ids:
        selected = options[0]["id"] if options else None
    state = {
        "conversation": conversation_data(conversation) if conversation else None,
        # The cards are in the page itself; the script needs each model's context length.
        "checkpoints": [{k: v for k, v in o.items() if k != "card"} for o in options],
        "checkpoint": selected,
        "limits": asdict(services.chat_limits()),
        "urls": {
            "page": reverse("chat-page"),
            "conversations": reverse("chat-conversations-json"),
            "socket": "/ws/chat/",
            "feedback": "/api/chat/messages/",  # + <id>/feedback/ (chat/corrections_api.py)
            "datasets": "/api/chat/datasets/",
        },
        "datasets": [{"id": d.pk, "name": d.name} for d in corrections.datasets_of(request.user)],
    }
    context = {
        "conversation": conversation,
        "conversations": conversation_list(request.user),
        "checkpoints": options,
        "selected_checkpoint": selected,
        "limits": services.chat_limits(),
        "modes": Conversation.Mode.choices,
        "state": state,
    }
    return render(request, "chat/chat.html", context)


def picker_options() -> list[dict]:
    """The checkpoints to chat with, then a "follow run" entry per run that saved one
    (id `run-<id>`: its newest checkpoint answers each message; the card is that one's).
    Every entry's `checkpoint` is the id of the checkpoint its card describes."""
    followed = selectors.followable_runs()
    entries = checkpoints.picker_entries(
        [*services.checkpoints_for_picker(), *(checkpoint for _, checkpoint in followed)]
    )
    for entry in entries:
        entry["checkpoint"] = entry["id"]
    follows = entries[len(entries) - len(followed) :]
    for (run, _), entry in zip(followed, follows, strict=True):
        entry.update(id=f"run-{run.pk}", label=f"follow run #{run.pk} · {run}", run=run.pk)
    return entries[: len(entries) - len(followed)] + follows


def _json_login_required(view):
    """Like login_required, but a script gets a 403 it can read instead of a login page."""

    @wraps(view)
    def wrapper(request, *args, **kwargs):
        if not request.user.is_authenticated:
            return JsonResponse({"detail": "log in first"}, status=403)
        return view(request, *args, **kwargs)

    return wrapper


@_json_login_required
@require_GET
def conversations_json(request):
    return JsonResponse({"conversations": conversation_list(request.user)})


@_json_login_required
@require_GET
def conversation_json(request, conversation_id: int):
    try:
        conversation = _own_conversation(request.user, conversation_id)
    except Http404:
        return JsonResponse({"detail": "no such conversation"}, status=404)
    return JsonResponse(conversation_data(conversation))


# ---- what the page and the script are given -----------------------------------------------


def conversation_list(user) -> list[dict]:
    """The user's conversations, most recently used first (Conversation's default order)."""
    rows = services.conversations_of(user)[:CONVERSATIONS_SHOWN]
    return [
        {
            "id": c.pk,
            "title": str(c),
            "updated": c.updated.isoformat(),
            "url": reverse("chat-conversation", args=[c.pk]),
        }
        for c in rows
    ]


def conversation_data(conversation: Conversation) -> dict:
    return {
        "id": conversation.pk,
        "title": str(conversation),
        "checkpoint": conversation.checkpoint_id,
        "mode": conversation.mode,
        "system": conversation.system_prompt,
        "url": reverse("chat-conversation", args=[conversation.pk]),
        "messages": [message_data(m) for m in conversation.messages.select_related("feedback")],
    }


def message_data(message: Message) -> dict:
    return {
        "id": message.pk,
        "role": message.role,
        "content": message.content,
        "parts": message.parts,
        "finish_reason": message.finish_reason,
        "prompt_tokens": message.prompt_tokens,
        "completion_tokens": message.completion_tokens,
        "time_to_first_token": message.time_to_first_token,
        "tokens_per_second": message.tokens_per_second,
        "context_start": message.context_start_id,
        "feedback": corrections.feedback_data(corrections.feedback_of(message)),
        "checkpoint": message.checkpoint_id,
        "step": message.checkpoint_step,
    }


def _own_conversation(user, conversation_id: int) -> Conversation:
    conversation = services.conversations_of(user).filter(pk=conversation_id).first()
    if conversation is None:
        raise Http404("no such conversation")
    return conversation
