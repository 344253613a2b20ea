"""Conversation business logic: what a send, a regenerate or an edit does to the database.

Each action happens in two steps around the generation. `begin_*` checks ownership and the
limits and returns a `PendingReply` -- the prompt for the engine and the message the reply
answers (its *anchor*). `finish_reply` then applies the action in one transaction: the edited
text replaces the anchor's, every message after the anchor goes (the replaced reply, or the
rest of an edited conversation), and the new reply is saved. So a failed generation changes
nothing, except a send's user message, which is saved up front (the chat shows it at once)
and removed again by `abandon_reply`.

Another user's conversation is reported exactly like a missing one: ids leak nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Case, IntegerField, QuerySet, Value, When

from chat import limits
from chat.limits import FieldError, Limits, Sampling
from chat.models import Conversation, Message
from chat.protocol import Final, GenerationRequest
from runs.models import Checkpoint

TITLE_CHARS = 80


@dataclass(frozen=True)
class PendingReply:
    conversation_id: int
    anchor_id: int  # the user message the reply answers
    checkpoint_id: int
    checkpoint_path: str
    step: int
    messages: list[dict[str, Any]]  # the prompt, in the chat format, ending with the anchor
    new_content: str | None = None  # an edit's replacement text for the anchor
    created_conversation: bool = False
    saved_user_message: bool = False  # a send: removed again if nothing is generated

    def request(self, sampling: Sampling, seed: int) -> GenerationRequest:
        return GenerationRequest(
            checkpoint_path=self.checkpoint_path,
            step=self.step,
            messages=self.messages,
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            max_tokens=sampling.max_tokens,
            seed=seed,
        )


def chat_limits() -> Limits:
    return Limits(**settings.CHAT_LIMITS)


def checkpoints_for_picker() -> QuerySet[Checkpoint]:
    """Checkpoints a user may chat with: chat-tuned ones (SFT, RL) first, newest first within."""
    rank = Case(
        When(stage__in=[Checkpoint.Stage.SFT, Checkpoint.Stage.RL], then=Value(0)),
        When(stage=Checkpoint.Stage.MID, then=Value(1)),
        default=Value(2),
        output_field=IntegerField(),
    )
    return Checkpoint.objects.annotate(picker_rank=rank).order_by("picker_rank", "-created", "-id")


def conversations_of(user) -> QuerySet[Conversation]:
    return Conversation.objects.filter(owner=user)


def get_conversation(user, conversation_id: int) -> Conversation:
    try:
        return conversations_of(user).get(pk=conversation_id)
    except Conversation.DoesNotExist:
        raise FieldError("conversation", "no such conversation") from None


def begin_send(
    user, conversation_id: int | None, checkpoint_id: int, content: str, lim: Limits
) -> PendingReply:
    """Save the user's message (in a new conversation when conversation_id is None)."""
    checkpoint = _checkpoint(checkpoint_id)
    with transaction.atomic():
        created = conversation_id is None
        if created:
            conversation = Conversation.objects.create(
                owner=user,
                title=_title(content),
                checkpoint=checkpoint,
                checkpoint_step=checkpoint.step,
            )
            history: list[Message] = []
        else:
            conversation = get_conversation(user, conversation_id)
            history = list(conversation.messages.all())
            if history and history[-1].role == Message.Role.USER:
                raise FieldError(
                    "conversation",
                    "the last message has no reply yet: regenerate it or edit it instead",
                )
        limits.conversation_size([len(m.content) for m in history] + [len(content)], lim)
        anchor = conversation.messages.create(role=Message.Role.USER, content=content)
    return PendingReply(
        conversation_id=conversation.pk,
        anchor_id=anchor.pk,
        checkpoint_id=checkpoint.pk,
        checkpoint_path=checkpoint.path,
        step=checkpoint.step,
        messages=[m.as_chat() for m in history] + [anchor.as_chat()],
        created_conversation=created,
        saved_user_message=True,
    )


def begin_regenerate(user, conversation_id: int, checkpoint_id: int | None) -> PendingReply:
    """A new reply to the conversation's last user message, to replace the reply after it."""
    conversation = get_conversation(user, conversation_id)
    history = list(conversation.messages.all())
    users = [i for i, m in enumerate(history) if m.role == Message.Role.USER]
    if not users:
        raise FieldError("conversation", "the conversation has no message to reply to")
    last = users[-1]
    checkpoint = _conversation_checkpoint(conversation, checkpoint_id)
    return _pending(conversation, history[: last + 1], checkpoint)


def begin_edit(
    user,
    conversation_id: int,
    message_id: int,
    content: str,
    checkpoint_id: int | None,
    lim: Limits,
) -> PendingReply:
    """A reply to a user message with new text; the conversation will end there."""
    conversation = get_conversation(user, conversation_id)
    history = list(conversation.messages.all())
    index = next((i for i, m in enumerate(history) if m.pk == message_id), None)
    if index is None or history[index].role != Message.Role.USER:
        raise FieldError("message", "no such user message in this conversation")
    kept = history[:index]
    limits.conversation_size([len(m.content) for m in kept] + [len(content)], lim)
    checkpoint = _conversation_checkpoint(conversation, checkpoint_id)
    pending = _pending(conversation, history[: index + 1], checkpoint)
    messages = [*pending.messages[:-1], {"role": "user", "content": content}]
    return replace(pending, messages=messages, new_content=content)


def finish_reply(pending: PendingReply, final: Final, sampling: dict[str, Any]) -> Message:
    """Apply the action and save the reply, in one transaction."""
    with transaction.atomic():
        conversation = Conversation.objects.select_for_update().get(pk=pending.conversation_id)
        anchor = conversation.messages.filter(pk=pending.anchor_id).first()
        if anchor is None:
            raise FieldError("message", "the message this reply answers was deleted meanwhile")
        if pending.new_content is not None:
            anchor.content = pending.new_content
            anchor.save(update_fields=["content"])
        conversation.messages.filter(pk__gt=anchor.pk).delete()
        reply = conversation.messages.create(
            role=Message.Role.ASSISTANT,
            content=final.content,
            parts=final.parts,
            sampling=sampling,
            prompt_tokens=final.prompt_tokens,
            completion_tokens=final.completion_tokens,
            time_to_first_token=final.time_to_first_token,
            tokens_per_second=final.tokens_per_second,
            finish_reason=final.finish_reason,
        )
        conversation.checkpoint_id = _existing_checkpoint_id(pending.checkpoint_id)
        conversation.checkpoint_step = pending.step
        conversation.save(update_fields=["checkpoint", "checkpoint_step", "updated"])
    return reply


def abandon_reply(pending: PendingReply) -> None:
    """Undo what begin_* saved, when nothing could be generated."""
    if not pending.saved_user_message:
        return
    with transaction.atomic():
        Message.objects.filter(pk=pending.anchor_id).delete()
        if pending.created_conversation:
            Conversation.objects.filter(pk=pending.conversation_id, messages__isnull=True).delete()


def _pending(
    conversation: Conversation, history: list[Message], checkpoint: Checkpoint
) -> PendingReply:
    return PendingReply(
        conversation_id=conversation.pk,
        anchor_id=history[-1].pk,
        checkpoint_id=checkpoint.pk,
        checkpoint_path=checkpoint.path,
        step=checkpoint.step,
        messages=[m.as_chat() for m in history],
    )


def _checkpoint(checkpoint_id: int) -> Checkpoint:
    try:
        return Checkpoint.objects.get(pk=checkpoint_id)
    except Checkpoint.DoesNotExist:
        raise FieldError("checkpoint", "no such checkpoint") from None


def _conversation_checkpoint(conversation: Conversation, checkpoint_id: int | None) -> Checkpoint:
    if checkpoint_id is not None:
        return _checkpoint(checkpoint_id)
    if conversation.checkpoint_id is None:
        raise FieldError("checkpoint", "choose a checkpoint: this conversation's model is gone")
    return conversation.checkpoint


def _existing_checkpoint_id(checkpoint_id: int) -> int | None:
    # The checkpoint may have been deleted during the generation.
    return checkpoint_id if Checkpoint.objects.filter(pk=checkpoint_id).exists() else None


def _title(content: str) -> str:
    line = " ".join(content.split())
    return line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1] + "…"
