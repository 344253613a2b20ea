"""Pages of the conversation datasets: list, detail (entries, export, fine-tune), entry editor,
and the chat page's "fine-tune on my corrections" button.

Forms post here; every rule is in chat/corrections.py, whose errors become a message on the
page. Another user's dataset or entry is a 404, exactly like a missing one.
"""

from __future__ import annotations

from functools import wraps

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from chat import corrections
from chat.corrections_api import jsonl_download
from chat.limits import FieldError
from chat.services import chat_limits
from nanochat_site import limits
from runs.programs import program_for
from training.flags import ConfigError


def _owned(view):
    """A missing or someone else's object is a 404."""

    @wraps(view)
    def wrapper(request, *args, **kwargs):
        try:
            return view(request, *args, **kwargs)
        except corrections.NotFound as exc:
            raise Http404(str(exc)) from None

    return wrapper


def _complain(request, exc: Exception) -> None:
    if isinstance(exc, FieldError):
        messages.error(request, f"{exc.field}: {exc.message}")
    else:  # ConfigError from the run submission
        for field, why in exc.errors.items():
            messages.error(request, f"{field}: {why}")


def _int_field(request, name: str) -> int | None:
    raw = request.POST.get(name, "").strip()
    if not raw:
        return None
    try:
        return limits.to_int(raw, name, lo=1)
    except limits.QueryParamError as exc:
        raise FieldError(name, exc.message) from None


@login_required
@require_http_methods(["GET", "POST"])
def datasets_page(request):
    if request.method == "POST":
        try:
            dataset = corrections.create_dataset(
                request.user, request.POST.get("name"), _int_field(request, "checkpoint")
            )
        except FieldError as exc:
            _complain(request, exc)
            return redirect("chat-datasets")
        return redirect("chat-dataset", dataset.pk)
    datasets = corrections.datasets_of(request.user)
    return render(request, "chat/datasets.html", {"datasets": datasets})


@login_required
@require_GET
@_owned
def dataset_page(request, dataset_id: int):
    dataset = corrections.get_dataset(request.user, dataset_id)
    context = {
        "dataset": dataset,
        "entries": [
            {
                "entry": entry,
                "messages": [
                    (m["role"], corrections.message_text(m["content"])) for m in entry.messages
                ],
            }
            for entry in dataset.entries.select_related("conversation")
        ],
        "presets": program_for("sft").flags.presets(),
        "default_preset": corrections.DEFAULT_PRESET,
        "default_weight": corrections.DEFAULT_WEIGHT,
    }
    return render(request, "chat/dataset.html", context)


@login_required
@require_POST
@_owned
def dataset_action(request, dataset_id: int, action: str):
    """collect | finetune | rename | delete, from the dataset page's forms."""
    user = request.user
    try:
        if action == "collect":
            added = corrections.collect(user, dataset_id, _int_field(request, "checkpoint"))
            messages.success(request, f"{len(added)} conversation(s) collected.")
        elif action == "finetune":
            run = corrections.finetune(
                user, dataset_id, preset=request.POST.get("preset", corrections.DEFAULT_PRESET),
                weight=_int_field(request, "weight") or corrections.DEFAULT_WEIGHT,
            )  # fmt: skip
            return redirect("run-detail", run.pk)
        elif action == "rename":
            corrections.update_dataset(user, dataset_id, name=request.POST.get("name"))
        elif action == "delete":
            corrections.delete_dataset(user, dataset_id)
            return redirect("chat-datasets")
        else:
            raise Http404("no such action")
    except (FieldError, ConfigError) as exc:
        _complain(request, exc)
    return redirect("chat-dataset", dataset_id)


@login_required
@require_GET
@_owned
def export_page(request, dataset_id: int):
    return jsonl_download(corrections.get_dataset(request.user, dataset_id))


@login_required
@require_http_methods(["GET", "POST"])
@_owned
def entry_page(request, dataset_id: int, entry_id: int):
    """Edit the text of an entry's messages, or remove the entry."""
    entry = corrections.get_entry(request.user, dataset_id, entry_id)
    if request.method == "POST":
        if "remove" in request.POST:
            corrections.remove_entry(request.user, dataset_id, entry_id)
            return redirect("chat-dataset", dataset_id)
        edited = [
            {"role": m["role"], "content": request.POST.get(f"content-{i}", "")}
            for i, m in enumerate(entry.messages)
        ]
        try:
            corrections.update_entry(request.user, dataset_id, entry_id, edited, chat_limits())
        except FieldError as exc:
            _complain(request, exc)
            return redirect("chat-dataset-entry", dataset_id, entry_id)
        messages.success(request, "Entry saved.")
        return redirect("chat-dataset", dataset_id)
    rows = [
        {"index": i, "role": m["role"], "text": corrections.message_text(m["content"])}
        for i, m in enumerate(entry.messages)
    ]
    return render(
        request,
        "chat/dataset_entry.html",
        {"dataset": entry.dataset, "entry": entry, "rows": rows, "limits": chat_limits()},
    )


@login_required
@require_POST
def finetune_corrections(request):
    """The chat page's button: fine-tune the chatted checkpoint on the user's corrections."""
    try:
        checkpoint = _int_field(request, "checkpoint")
        if checkpoint is None:
            raise FieldError("checkpoint", "choose the checkpoint to fine-tune")
        run = corrections.finetune_on_corrections(
            request.user, checkpoint, preset=request.POST.get("preset", corrections.DEFAULT_PRESET)
        )
    except (FieldError, ConfigError) as exc:
        _complain(request, exc)
        return redirect("chat-datasets")
    messages.success(request, "Fine-tuning on your corrections: the run is queued.")
    return redirect("run-detail", run.pk)
