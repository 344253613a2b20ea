"""Conversations with checkpoints: who talked to which model, what was said, and how fast.

An assistant message keeps what the engine reported about its generation (token counts,
time to first token, decode speed, why it ended) beside its text, so the admin and the chat
page can show a reply's cost without recomputing anything. Messages are ordered by id: an
edit changes a message in place and deletes the ones after it, so ids stay in talk order.

A conversation has a mode: `chat` renders it with the chat template (its system prompt, when
set, first), `completion` continues its text as one raw document (a base model never learned
the template). A reply records where the model's view of the conversation began when older
turns had to be left out to fit the context (chat/context.py), so the page can mark it.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone


class Conversation(models.Model):
    class Mode(models.TextChoices):
        CHAT = "chat"
        COMPLETION = "completion"

    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="conversations"
    )
    title = models.CharField(max_length=200, blank=True)
    # The model of the latest reply (a conversation may switch models between replies).
    checkpoint = models.ForeignKey(
        "runs.Checkpoint",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="conversations",
    )
    checkpoint_step = models.IntegerField(null=True, blank=True)
    mode = models.CharField(max_length=16, choices=Mode.choices, default=Mode.CHAT)
    # The system message of every prompt in chat mode (SPEC §3); "" for none.
    system_prompt = models.TextField(blank=True)
    created = models.DateTimeField(default=timezone.now)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-updated", "-id"]
        indexes = [models.Index(fields=["owner", "-updated"], name="chat_conv_owner_updated")]

    def __str__(self) -> str:
        return self.title or f"conversation {self.pk}"


class Message(models.Model):
    class Role(models.TextChoices):
        USER = "user"
        ASSISTANT = "assistant"

    class Finish(models.TextChoices):
        STOP = "stop", "stop token"
        LENGTH = "length", "max tokens reached"
        STOPPED = "stopped", "stopped by the user"

    conversation = models.ForeignKey(
        Conversation, on_delete=models.CASCADE, related_name="messages"
    )
    role = models.CharField(max_length=16, choices=Role.choices)
    # The readable text; for a reply with tool calls, its text parts joined.
    content = models.TextField(blank=True)
    # A reply with tool calls: [{"type": "text"|"python"|"python_output", "text": ...}, ...].
    parts = models.JSONField(default=list, blank=True)
    sampling = models.JSONField(default=dict, blank=True)  # temperature, top_k, max_tokens, seed
    prompt_tokens = models.IntegerField(null=True, blank=True)
    completion_tokens = models.IntegerField(null=True, blank=True)
    time_to_first_token = models.FloatField(null=True, blank=True)  # seconds
    tokens_per_second = models.FloatField(null=True, blank=True)
    finish_reason = models.CharField(max_length=16, choices=Finish.choices, blank=True)
    # A reply whose prompt left out older turns: the first message the model saw (None: all).
    context_start = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    # The checkpoint and step that answered: a conversation following a run (`run-<id>`)
    # is answered by whichever checkpoint was the run's newest when the message was sent.
    checkpoint = models.ForeignKey(
        "runs.Checkpoint", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    checkpoint_step = models.IntegerField(null=True, blank=True)
    created = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        text = self.content if len(self.content) <= 60 else self.content[:57] + "..."
        return f"{self.role}: {text}"

    def as_chat(self) -> dict:
        """The message in the chat format the tokenizer renders (SPEC §3)."""
        return {"role": self.role, "content": self.parts or self.content}


# ---- corrections become data (issue 17) ---------------------------------------------------


class Feedback(models.Model):
    """A user's verdict on one assistant reply: a thumb, and/or a corrected text.

    A correction replaces the reply's text in the conversation (so the chat shows it and later
    turns build on it) while the reply as generated stays here, beside it, for the record.
    Lives in its own row so that a message without feedback costs nothing.
    """

    class Rating(models.IntegerChoices):
        DOWN = -1, "thumbs down"
        NONE = 0, "no rating"
        UP = 1, "thumbs up"

    message = models.OneToOneField(Message, on_delete=models.CASCADE, related_name="feedback")
    rating = models.SmallIntegerField(choices=Rating.choices, default=Rating.NONE)
    corrected = models.BooleanField(default=False)
    # The reply as the model wrote it, kept once it has been corrected.
    original_content = models.TextField(blank=True)
    original_parts = models.JSONField(default=list, blank=True)
    updated = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"feedback on message {self.message_id}"


class ConversationDataset(models.Model):
    """A user's named collection of conversations to fine-tune on (exported as CustomJSON)."""

    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="conversation_datasets"
    )
    name = models.CharField(max_length=100)
    # The model the conversations were had with: a fine-tune starts from it.
    source_checkpoint = models.ForeignKey(
        "runs.Checkpoint",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="conversation_datasets",
    )
    created = models.DateTimeField(default=timezone.now)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-updated", "-id"]
        constraints = [
            models.UniqueConstraint(fields=["owner", "name"], name="chat_dataset_owner_name")
        ]

    def __str__(self) -> str:
        return self.name


class DatasetEntry(models.Model):
    """One conversation of a dataset, as it will be trained (a snapshot: editing the entry or
    the source conversation later does not change the other)."""

    dataset = models.ForeignKey(
        ConversationDataset, on_delete=models.CASCADE, related_name="entries"
    )
    conversation = models.ForeignKey(
        Conversation, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    # The last reply taken (the conversation was cut after it).
    message = models.ForeignKey(
        Message, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    messages = models.JSONField(default=list)  # the chat format of SPEC §3
    created = models.DateTimeField(default=timezone.now)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"entry {self.pk} of {self.dataset}"
