"""Corrections become data: feedback on replies, conversation datasets, and fine-tuning on them.

A user rates an assistant reply (thumbs up / down) or corrects it: the corrected text replaces
the reply in the conversation (the chat shows it and later turns build on it) and the reply as
the model wrote it is kept in its Feedback row. A conversation with a *good* reply (upvoted or
corrected) can go into one of the user's named datasets, as a snapshot of the messages to train
on: the conversation up to its last good reply, its system prompt first. A dataset exports as
the CustomJSON JSONL that training/chat_sft.py reads, and one call fine-tunes the model the
conversations were had with on it (an SFT run whose mixture lists the export `weight` times
before the preset's own mixture, so the corrections count more than any single task).

Every function takes the acting user and reaches objects only through that user's own rows:
another user's message, conversation, dataset or entry is reported exactly like a missing one
(NotFound), so ids leak nothing. Bad input raises FieldError naming the field. The views, the
API and the admin call these functions; none of them repeats a rule.
"""

from __future__ import annotations

import json
import secrets
import unicodedata
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from django.db import IntegrityError, transaction
from django.db.models import Q, QuerySet
from django.utils import timezone

from chat import limits
from chat.limits import FieldError, Limits
from chat.models import Conversation, ConversationDataset, DatasetEntry, Feedback, Message
from nanochat_site.limits import nesting_exceeds
from runs import layout
from runs import services as run_services
from runs.models import Checkpoint, Kind, Run
from runs.programs import program_for
from training.flags import ConfigError
from training.tasks.customjson import parse_conversation

NAME_LENGTH = 100
# How many times the export is listed in the fine-tune's mixture (`customjson:<file>*N`).
DEFAULT_WEIGHT = 3
MAX_WEIGHT = 100
# The SFT preset of a one-button fine-tune unless the caller names another.
DEFAULT_PRESET = "demo-cpu"
EXPORTS = "conversation_datasets"  # top-level folder under the data home


class NotFound(Exception):
    """No such object among the user's own (another user's is reported the same way)."""


# ---- feedback ---------------------------------------------------------------------------------


def get_reply(user, message_id: int) -> Message:
    """One of the user's assistant replies."""
    message = (
        Message.objects.filter(pk=message_id, role=Message.Role.ASSISTANT, conversation__owner=user)
        .select_related("conversation")
        .first()
    )
    if message is None:
        raise NotFound("no such reply")
    return message


def feedback_of(message: Message) -> Feedback | None:
    try:
        return message.feedback
    except Feedback.DoesNotExist:
        return None


def give_feedback(
    user, message_id: int, *, rating: Any = None, correction: Any = None, lim: Limits
) -> Feedback:
    """Rate a reply (-1, 0 to clear, 1) and/or correct its text; either may be None (left as is).

    A correction equal to the reply as generated undoes the correction."""
    if rating is None and correction is None:
        raise FieldError("rating", "give a rating, a correction or both")
    if rating is not None and (isinstance(rating, bool) or rating not in Feedback.Rating.values):
        raise FieldError("rating", "rating must be -1 (down), 0 (none) or 1 (up)")
    if correction is not None:
        correction = limits.content({"correction": correction}, lim, field="correction")
    with transaction.atomic():
        message = get_reply(user, message_id)
        message = Message.objects.select_for_update().get(pk=message.pk)
        feedback, _ = Feedback.objects.get_or_create(message=message)
        if rating is not None:
            feedback.rating = rating
        if correction is not None:
            others = message.conversation.messages.exclude(pk=message.pk)
            limits.conversation_size([len(m.content) for m in others] + [len(correction)], lim)
            _apply_correction(message, feedback, correction)
        feedback.save()
    return feedback


def _apply_correction(message: Message, feedback: Feedback, text: str) -> None:
    if not feedback.corrected:
        if text == message.content and not message.parts:
            return  # nothing changed
        feedback.original_content, feedback.original_parts = message.content, message.parts
        feedback.corrected = True
    if text == feedback.original_content and not feedback.original_parts:
        feedback.corrected = False  # back to what the model wrote
        feedback.original_content, feedback.original_parts = "", []
    message.content, message.parts = text, []
    message.save(update_fields=["content", "parts"])


def feedback_data(feedback: Feedback | None) -> dict[str, Any]:
    """What the chat page and the API show of a reply's feedback."""
    if feedback is None:
        return {"rating": 0, "corrected": False, "original_content": None}
    return {
        "rating": feedback.rating,
        "corrected": feedback.corrected,
        "original_content": feedback.original_content if feedback.corrected else None,
    }


def _good(message: Message) -> bool:
    feedback = feedback_of(message)
    return feedback is not None and (feedback.corrected or feedback.rating == Feedback.Rating.UP)


def _bad(message: Message) -> bool:
    feedback = feedback_of(message)
    return feedback is not None and not feedback.corrected and feedback.rating < 0


# ---- datasets ---------------------------------------------------------------------------------


def check_name(name: Any) -> str:
    """A dataset name: one line of readable text, a display value that is never a path."""
    if not isinstance(name, str) or not name.strip():
        raise FieldError("name", "name is required")
    name = name.strip()
    if len(name) > NAME_LENGTH:
        raise FieldError("name", f"name may have at most {NAME_LENGTH} characters")
    if any(unicodedata.category(c).startswith("C") for c in name):
        raise FieldError("name", "name must not contain control characters")
    if "/" in name or "\\" in name or name in (".", ".."):
        raise FieldError("name", "name must not look like a path (no '/', '\\', '.' or '..')")
    return name


def datasets_of(user) -> QuerySet[ConversationDataset]:
    return ConversationDataset.objects.filter(owner=user).select_related("source_checkpoint")


def get_dataset(user, dataset_id: int) -> ConversationDataset:
    dataset = datasets_of(user).filter(pk=dataset_id).first()
    if dataset is None:
        raise NotFound("no such dataset")
    return dataset


def create_dataset(user, name: Any, checkpoint_id: int | None = None) -> ConversationDataset:
    name = check_name(name)
    checkpoint = _checkpoint(checkpoint_id) if checkpoint_id is not None else None
    try:
        with transaction.atomic():
            return ConversationDataset.objects.create(
                owner=user, name=name, source_checkpoint=checkpoint
            )
    except IntegrityError:
        raise FieldError("name", f"you already have a dataset named {name!r}") from None


def update_dataset(
    user, dataset_id: int, *, name: Any = None, checkpoint_id: int | None = None
) -> ConversationDataset:
    dataset = get_dataset(user, dataset_id)
    if name is not None:
        dataset.name = check_name(name)
    if checkpoint_id is not None:
        dataset.source_checkpoint = _checkpoint(checkpoint_id)
    try:
        with transaction.atomic():
            dataset.save()
    except IntegrityError:
        raise FieldError("name", f"you already have a dataset named {dataset.name!r}") from None
    return dataset


def delete_dataset(user, dataset_id: int) -> None:
    get_dataset(user, dataset_id).delete()


def _checkpoint(checkpoint_id: int) -> Checkpoint:
    checkpoint = Checkpoint.objects.filter(pk=checkpoint_id).first()
    if checkpoint is None:
        raise FieldError("checkpoint", "no such checkpoint")
    return checkpoint


# ---- entries ----------------------------------------------------------------------------------


def trained_messages(conversation: Conversation) -> tuple[list[dict[str, Any]], Message]:
    """The messages to train on -- the conversation up to its last good reply, system prompt
    first -- and that reply. A thumbs-down reply that was not corrected would teach the very
    answer the user rejected, so a conversation with one before its last good reply is refused."""
    if conversation.mode != Conversation.Mode.CHAT:
        raise FieldError("conversation", "only chat-mode conversations can be trained on")
    history = list(conversation.messages.select_related("feedback"))
    last = max((i for i, m in enumerate(history) if _good(m)), default=None)
    if last is None:
        raise FieldError(
            "conversation", "the conversation has no upvoted or corrected reply to train on"
        )
    kept = history[: last + 1]
    if any(_bad(m) for m in kept):
        raise FieldError(
            "conversation",
            "a reply before the last good one has a thumbs down: correct it or clear the rating",
        )
    messages = [m.as_chat() for m in kept]
    if conversation.system_prompt:
        messages.insert(0, {"role": "system", "content": conversation.system_prompt})
    return messages, kept[-1]


def add_conversation(user, dataset_id: int, conversation_id: int) -> DatasetEntry:
    """Put the conversation's trained messages in the dataset (replacing its earlier snapshot)."""
    dataset = get_dataset(user, dataset_id)
    conversation = Conversation.objects.filter(owner=user, pk=conversation_id).first()
    if conversation is None:
        raise NotFound("no such conversation")
    messages, reply = trained_messages(conversation)
    with transaction.atomic():
        entry, _ = DatasetEntry.objects.update_or_create(
            dataset=dataset,
            conversation=conversation,
            defaults={"message": reply, "messages": messages},
        )
        if dataset.source_checkpoint_id is None and conversation.checkpoint_id is not None:
            dataset.source_checkpoint_id = conversation.checkpoint_id
        dataset.save()
    return entry


def collect(user, dataset_id: int, checkpoint_id: int | None = None) -> list[DatasetEntry]:
    """Add every conversation of the user's, with the checkpoint (default: the dataset's), that
    has an upvoted or corrected reply; ones that cannot be trained on are skipped."""
    dataset = get_dataset(user, dataset_id)
    checkpoint_id = checkpoint_id or dataset.source_checkpoint_id
    if checkpoint_id is None:
        raise FieldError("checkpoint", "choose the checkpoint whose conversations to collect")
    good = Q(messages__feedback__rating=Feedback.Rating.UP) | Q(messages__feedback__corrected=True)
    conversations = (
        Conversation.objects.filter(owner=user, checkpoint_id=checkpoint_id, mode="chat")
        .filter(good)
        .distinct()
        .order_by("id")
    )
    if dataset.source_checkpoint_id is None:
        update_dataset(user, dataset.pk, checkpoint_id=checkpoint_id)
    entries = []
    for conversation in conversations:
        try:
            entries.append(add_conversation(user, dataset.pk, conversation.pk))
        except FieldError:
            continue  # e.g. a thumbs-down reply left uncorrected
    return entries


def get_entry(user, dataset_id: int, entry_id: int) -> DatasetEntry:
    # The dataset by its primary key first: Django turns an out-of-range id in a pk lookup into
    # "no rows", but a foreign-key lookup (dataset_id=...) would send it to the database, where
    # SQLite raises OverflowError and PostgreSQL an out-of-range error (a 500 either way).
    dataset = get_dataset(user, dataset_id)
    entry = dataset.entries.filter(pk=entry_id).first()
    if entry is None:
        raise NotFound("no such entry")
    return entry


def check_messages(messages: Any, lim: Limits) -> list[dict[str, Any]]:
    """An edited entry: a conversation the SFT loader accepts, within the chat's limits."""
    if not isinstance(messages, list):
        raise FieldError("messages", "messages must be a list of {role, content} objects")
    if nesting_exceeds(messages, 8):
        raise FieldError("messages", "messages are nested too deeply")
    try:
        conversation = parse_conversation({"messages": messages})
    except (ValueError, TypeError, KeyError) as exc:
        raise FieldError("messages", str(exc)) from None
    texts = [message_text(m["content"]) for m in conversation["messages"]]
    for index, text in enumerate(texts):
        if "\x00" in text or len(text) > lim.max_message_chars:
            raise FieldError(
                "messages",
                f"message {index} must have at most {lim.max_message_chars} characters, no NUL",
            )
    limits.conversation_size([len(t) for t in texts], lim)
    return conversation["messages"]


def message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content)


def update_entry(user, dataset_id: int, entry_id: int, messages: Any, lim: Limits) -> DatasetEntry:
    entry = get_entry(user, dataset_id, entry_id)
    entry.messages = check_messages(messages, lim)
    entry.save(update_fields=["messages", "updated"])
    return entry


def remove_entry(user, dataset_id: int, entry_id: int) -> None:
    get_entry(user, dataset_id, entry_id).delete()


# ---- export and fine-tune ---------------------------------------------------------------------


def export_lines(dataset: ConversationDataset) -> Iterable[str]:
    """The dataset as CustomJSON JSONL lines (training/tasks/customjson.py), one per entry."""
    for entry in dataset.entries.all():
        yield json.dumps({"messages": entry.messages}, ensure_ascii=False) + "\n"


def export_filename(dataset: ConversationDataset) -> str:
    """A download's file name, from the id (the dataset's name is a display value)."""
    return f"conversation-dataset-{dataset.pk}.jsonl"


def write_export(dataset: ConversationDataset) -> Path:
    """Write the export to a new file of the app's own layout under the data home.

    Each export is a new file: a queued run reads the data as it was when it was submitted,
    whatever happens to the dataset afterwards."""
    if not dataset.entries.exists():
        raise FieldError("dataset", "the dataset has no conversations yet")
    folder = layout.data_home() / EXPORTS / f"dataset-{dataset.pk:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = timezone.now().strftime("%Y%m%d-%H%M%S")
    path = folder / f"export-{stamp}-{secrets.token_hex(3)}.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(export_lines(dataset))
    return path


def finetune(
    user,
    dataset_id: int,
    *,
    preset: str = DEFAULT_PRESET,
    weight: Any = DEFAULT_WEIGHT,
) -> Run:
    """Start an SFT run from the dataset's checkpoint on its export plus the preset's mixture.

    Submitted through runs.services like any run, so every rule of a run (stages, memory,
    mixture files inside the data home) applies; a ConfigError names what is wrong."""
    dataset = get_dataset(user, dataset_id)
    if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= MAX_WEIGHT:
        raise FieldError("weight", f"weight must be an integer from 1 to {MAX_WEIGHT}")
    if dataset.source_checkpoint is None:
        raise FieldError("checkpoint", "the dataset has no checkpoint to start from")
    program = program_for(Kind.SFT)
    base_mixture = program.validate(preset, {})["mixture"]  # ConfigError for a bad preset
    path = write_export(dataset)
    mixture = f"customjson:{path}*{weight},{base_mixture}"
    try:
        return run_services.submit_run(
            user, Kind.SFT, preset=preset, config={"mixture": mixture},
            parent_checkpoint=dataset.source_checkpoint,
            name=f"SFT on conversation dataset {dataset.pk}",
        )  # fmt: skip
    except ConfigError:
        path.unlink(missing_ok=True)  # no run will read it
        raise


def corrections_dataset(user, checkpoint_id: int) -> ConversationDataset:
    """The user's default dataset of corrections for a checkpoint (made on first use)."""
    checkpoint = _checkpoint(checkpoint_id)
    name = f"corrections of checkpoint {checkpoint.pk}"
    dataset = datasets_of(user).filter(name=name).first()
    return dataset or create_dataset(user, name, checkpoint.pk)


def finetune_on_corrections(user, checkpoint_id: int, *, preset: str = DEFAULT_PRESET) -> Run:
    """The chat page's one button: collect the user's upvoted and corrected conversations with
    the checkpoint into its corrections dataset, and fine-tune the checkpoint on them."""
    dataset = corrections_dataset(user, checkpoint_id)
    collect(user, dataset.pk, checkpoint_id)
    return finetune(user, dataset.pk, preset=preset)
