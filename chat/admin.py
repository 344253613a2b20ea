"""Admin for conversations and messages: browse who chatted with what, and each reply's cost;
and for the feedback on replies and the conversation datasets made of them."""

from django.contrib import admin

from chat.models import Conversation, ConversationDataset, DatasetEntry, Feedback, Message


class MessageInline(admin.TabularInline):
    model = Message
    extra = 0
    fields = ("role", "content", "finish_reason", "completion_tokens", "tokens_per_second")
    readonly_fields = fields
    show_change_link = True
    can_delete = False


@admin.register(Conversation)
class ConversationAdmin(admin.ModelAdmin):
    list_display = (
        "id", "title", "owner", "checkpoint", "checkpoint_step", "mode", "updated", "created",
    )  # fmt: skip
    list_filter = ("mode", "checkpoint__stage", "updated")
    search_fields = ("title", "owner__username", "messages__content")
    list_select_related = ("owner", "checkpoint")
    raw_id_fields = ("owner", "checkpoint")
    date_hierarchy = "updated"
    inlines = [MessageInline]


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = (
        "id", "conversation", "role", "short_content", "finish_reason", "prompt_tokens",
        "completion_tokens", "time_to_first_token", "tokens_per_second", "created",
    )  # fmt: skip
    list_filter = ("role", "finish_reason", "created")
    search_fields = ("content", "conversation__title", "conversation__owner__username")
    list_select_related = ("conversation",)
    raw_id_fields = ("conversation", "context_start")

    @admin.display(description="content")
    def short_content(self, message: Message) -> str:
        return message.content if len(message.content) <= 80 else message.content[:77] + "..."


@admin.register(Feedback)
class FeedbackAdmin(admin.ModelAdmin):
    list_display = ("id", "message", "rating", "corrected", "updated")
    list_filter = ("rating", "corrected", "updated")
    search_fields = (
        "message__content",
        "original_content",
        "message__conversation__owner__username",
    )
    raw_id_fields = ("message",)


class DatasetEntryInline(admin.TabularInline):
    model = DatasetEntry
    extra = 0
    fields = ("conversation", "message", "messages", "updated")
    readonly_fields = ("updated",)
    raw_id_fields = ("conversation", "message")


@admin.register(ConversationDataset)
class ConversationDatasetAdmin(admin.ModelAdmin):
    list_display = ("id", "name", "owner", "source_checkpoint", "updated", "created")
    search_fields = ("name", "owner__username")
    list_select_related = ("owner", "source_checkpoint")
    raw_id_fields = ("owner", "source_checkpoint")
    inlines = [DatasetEntryInline]
