"""Conversation business logic: what a send, a regenerate or an edit does to the database.

Each action happens in two steps around the generation. `begin_*` checks ownership and the
limits, fits the conversation into the model's context and returns a `PendingReply` -- the
prompt for the engine and the message the reply answers (its *anchor*). `finish_reply` then
applies the action in one transaction: the edited text replaces the anchor's, every message
after the anchor goes (the replaced reply, or the rest of an edited conversation), and the
new reply is saved. So a failed generation changes nothing, except a send's user message,
which is saved up front (the chat shows it at once) and removed again by `abandon_reply`.

The prompt is the conversation as the model will see it: in chat mode its messages with the
system prompt first, in completion mode its text as one document; either way with the oldest
turns left out when the whole would not leave the reply room in the model's context
(chat/context.py). The reply's max_tokens is capped by what the context leaves, and the
reply remembers where the model's view began.

A reply is answered by the checkpoint chosen, or -- following a run (`run_id`, the picker's
"follow run" entries and the API's `run-<id>` models) -- by that run's newest checkpoint at the
time of the action; the reply records the checkpoint and step that answered.

Another user's conversation is reported exactly like a missing one: ids leak nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Case, IntegerField, QuerySet, Value, When

from chat import checkpoints, limits
from chat.context import chat_prompt, completion_prompt, fit_chat, fit_completion
from chat.limits import FieldError, Limits, Sampling
from chat.models import Conversation, Message
from chat.protocol import Final, GenerationRequest
from runs import selectors
from runs.models import Checkpoint

TITLE_CHARS = 80


@dataclass(frozen=True)
class PendingReply:
    conversation_id: int
    anchor_id: int  # the user message the reply answers
    checkpoint_id: int
    checkpoint_path: str
    step: int
    # The prompt in the chat format (system message first when set), ending with the anchor;
    # [] in completion mode, whose prompt is `prompt`, the raw text to continue.
    messages: list[dict[str, Any]]
    prompt: str | None = None
    context_start_id: int | None = None  # the first message the model sees, when not all
    reply_room: int | None = None  # tokens the context leaves after the prompt (None: unknown)
    new_content: str | None = None  # an edit's replacement text for the anchor
    created_conversation: bool = False
    saved_user_message: bool = False  # a send: removed again if nothing is generated

    def fitted(self, sampling: Sampling) -> Sampling:
        """`sampling` with max_tokens capped by what the model's context leaves."""
        if self.reply_room is None or sampling.max_tokens <= self.reply_room:
            return sampling
        return replace(sampling, max_tokens=self.reply_room)

    def request(self, sampling: Sampling, seed: int) -> GenerationRequest:
        sampling = self.fitted(sampling)
        return GenerationRequest(
            checkpoint_path=self.checkpoint_path,
            step=self.step,
            messages=self.messages,
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            max_tokens=sampling.max_tokens,
            seed=seed,
            prompt=self.prompt,
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
    return (
        Checkpoint.objects.annotate(picker_rank=rank)
        .select_related("run__parent_checkpoint__run")
        .order_by("picker_rank", "-created", "-id")
    )


def conversations_of(user) -> QuerySet[Conversation]:
    return Conversation.objects.filter(owner=user)


def get_conversation(user, conversation_id: int) -> Conversation:
    try:
        return conversations_of(user).get(pk=conversation_id)
    except Conversation.DoesNotExist:
        raise FieldError("conversation", "no such conversation") from None


def begin_send(
    user,
    conversation_id: int | None,
    checkpoint_id: int | None,
    content: str,
    lim: Limits,
    sampling: Sampling | None = None,
    *,
    mode: str | None = None,
    system: str | None = None,
    run_id: int | None = None,
) -> PendingReply:
    """Save the user's message (in a new conversation, of `mode`, when conversation_id is
    None); `system`, when given, becomes the conversation's system prompt."""
    checkpoint = model_checkpoint(checkpoint_id, run_id)
    with transaction.atomic():
        created = conversation_id is None
        if created:
            conversation = Conversation(
                owner=user,
                title=_title(content),
                checkpoint=checkpoint,
                checkpoint_step=checkpoint.step,
                mode=mode or Conversation.Mode.CHAT,
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
        prompt = [m.as_chat() for m in history] + [{"role": "user", "content": content}]
        fitted = _fit(conversation, checkpoint, prompt, sampling or limits.sampling({}, lim),
                      mode=mode, system=system)  # fmt: skip
        conversation.save()
        anchor = conversation.messages.create(role=Message.Role.USER, content=content)
    return _pending(
        conversation, [*history, anchor], checkpoint, fitted,
        created_conversation=created, saved_user_message=True,
    )  # fmt: skip


def begin_regenerate(
    user,
    conversation_id: int,
    checkpoint_id: int | None,
    sampling: Sampling | None = None,
    *,
    mode: str | None = None,
    system: str | None = None,
    run_id: int | None = None,
) -> PendingReply:
    """A new reply to the conversation's last user message, to replace the reply after it."""
    conversation = get_conversation(user, conversation_id)
    history = list(conversation.messages.all())
    users = [i for i, m in enumerate(history) if m.role == Message.Role.USER]
    if not users:
        raise FieldError("conversation", "the conversation has no message to reply to")
    kept = history[: users[-1] + 1]
    checkpoint = _conversation_checkpoint(conversation, checkpoint_id, run_id)
    prompt = [m.as_chat() for m in kept]
    fitted = _fit(conversation, checkpoint, prompt, sampling or limits.sampling({}, chat_limits()),
                  mode=mode, system=system)  # fmt: skip
    conversation.save(update_fields=["system_prompt", "updated"])
    return _pending(conversation, kept, checkpoint, fitted)


def begin_edit(
    user,
    conversation_id: int,
    message_id: int,
    content: str,
    checkpoint_id: int | None,
    lim: Limits,
    sampling: Sampling | None = None,
    *,
    mode: str | None = None,
    system: str | None = None,
    run_id: int | None = None,
) -> PendingReply:
    """A reply to a user message with new text; the conversation will end there."""
    conversation = get_conversation(user, conversation_id)
    history = list(conversation.messages.all())
    index = next((i for i, m in enumerate(history) if m.pk == message_id), None)
    if index is None or history[index].role != Message.Role.USER:
        raise FieldError("message", "no such user message in this conversation")
    kept = history[:index]
    limits.conversation_size([len(m.content) for m in kept] + [len(content)], lim)
    checkpoint = _conversation_checkpoint(conversation, checkpoint_id, run_id)
    prompt = [m.as_chat() for m in kept] + [{"role": "user", "content": content}]
    fitted = _fit(conversation, checkpoint, prompt, sampling or limits.sampling({}, lim),
                  mode=mode, system=system)  # fmt: skip
    conversation.save(update_fields=["system_prompt", "updated"])
    pending = _pending(conversation, history[: index + 1], checkpoint, fitted)
    return replace(pending, new_content=content)


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
            context_start_id=_existing_message_id(conversation, pending.context_start_id),
            checkpoint_id=_existing_checkpoint_id(pending.checkpoint_id),
            checkpoint_step=pending.step,
        )
        conversation.checkpoint_id = reply.checkpoint_id
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


@dataclass(frozen=True)
class _Fitted:
    """A prompt fitted to the model's context: what the engine gets, and from where."""

    start: int  # index of the first message the model sees
    messages: list[dict[str, Any]]
    prompt: str | None
    reply_room: int | None


def _fit(
    conversation: Conversation,
    checkpoint: Checkpoint,
    prompt: list[dict[str, Any]],
    sampling: Sampling,
    *,
    mode: str | None,
    system: str | None,
) -> _Fitted:
    """Apply the frame's mode and system prompt to `conversation` (not saved) and fit
    `prompt` (its messages in the chat format, ending with the answered one) to the model.

    A checkpoint whose config or tokenizer cannot be read here goes unfitted: the engine
    worker then refuses a prompt that does not fit, as it always did."""
    if mode is not None and conversation.pk is not None and mode != conversation.mode:
        raise FieldError(
            "mode",
            f"this conversation is in {conversation.mode} mode: start a new conversation for "
            f"{mode} mode",
        )
    if system is not None:
        conversation.system_prompt = system
    completion = conversation.mode == Conversation.Mode.COMPLETION
    system = "" if completion else conversation.system_prompt
    config = checkpoints.model_config(checkpoint)
    context = checkpoints.context_length(config)
    tokenizer = checkpoints.tokenizer_for(checkpoint) if context else None
    start, room = 0, None
    if tokenizer is not None:
        try:
            if completion:
                window = fit_completion(tokenizer, prompt, context, sampling.max_tokens)
            else:
                window = fit_chat(tokenizer, prompt, system, context, sampling.max_tokens)
        except FieldError:
            raise
        except ValueError as exc:  # a stored conversation the chat template cannot render
            raise FieldError(
                "conversation", f"this conversation cannot be rendered: {exc}"
            ) from None
        start, room = window.start, context - window.prompt_tokens
    seen = prompt[start:]
    if completion:
        return _Fitted(start, [], completion_prompt(seen), room)
    return _Fitted(start, chat_prompt(seen, system), None, room)


def _pending(
    conversation: Conversation,
    history: list[Message],
    checkpoint: Checkpoint,
    fitted: _Fitted,
    **flags: bool,
) -> PendingReply:
    """The pending reply to history[-1], which the model sees from history[fitted.start]."""
    return PendingReply(
        conversation_id=conversation.pk,
        anchor_id=history[-1].pk,
        checkpoint_id=checkpoint.pk,
        checkpoint_path=checkpoint.path,
        step=checkpoint.step,
        messages=fitted.messages,
        prompt=fitted.prompt,
        context_start_id=history[fitted.start].pk if fitted.start else None,
        reply_room=fitted.reply_room,
        **flags,
    )


def model_checkpoint(checkpoint_id: int | None, run_id: int | None = None) -> Checkpoint:
    """The checkpoint that answers: the newest of the followed run when `run_id` is given
    (read now, so each message gets the run's latest model), else the one chosen."""
    if run_id is not None:
        found = selectors.newest_checkpoint(run_id)
        if found is None:
            raise FieldError("run", f"run {run_id} does not exist or has saved no checkpoint yet")
        return found
    if checkpoint_id is None:
        raise FieldError("checkpoint", "checkpoint is required")
    return _checkpoint(checkpoint_id)


def _checkpoint(checkpoint_id: int) -> Checkpoint:
    try:
        return Checkpoint.objects.get(pk=checkpoint_id)
    except Checkpoint.DoesNotExist:
        raise FieldError("checkpoint", "no such checkpoint") from None


def _conversation_checkpoint(
    conversation: Conversation, checkpoint_id: int | None, run_id: int | None = None
) -> Checkpoint:
    if checkpoint_id is not None or run_id is not None:
        return model_checkpoint(checkpoint_id, run_id)
    if conversation.checkpoint_id is None:
        raise FieldError("checkpoint", "choose a checkpoint: this conversation's model is gone")
    return conversation.checkpoint


def _existing_message_id(conversation: Conversation, message_id: int | None) -> int | None:
    # Only the admin can delete a message from the middle of a conversation.
    if message_id is None or not conversation.messages.filter(pk=message_id).exists():
        return None
    return message_id


def _existing_checkpoint_id(checkpoint_id: int) -> int | None:
    # The checkpoint may have been deleted during the generation.
    return checkpoint_id if Checkpoint.objects.filter(pk=checkpoint_id).exists() else None


def _title(content: str) -> str:
    line = " ".join(content.split())
    return line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1] + "…"
