"""The admin for alerts: users' settings and rules (editable, like on the Alerts page, and
checked by the same services), and the notification and delivery log (read-only: it records
what happened) with one action, sending failed deliveries again."""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages

from alerts import services
from alerts.models import AlertRule, AlertSettings, Delivery, Notification
from training.flags import ConfigError


class AlertSettingsForm(forms.ModelForm):
    class Meta:
        model = AlertSettings
        fields = ["user", "webhook_enabled", "webhook_url", "email_enabled", "email",
                  "on_succeeded", "on_failed", "on_cancelled", "include_stages"]  # fmt: skip

    def clean_webhook_url(self) -> str:
        """The address policy applies here too (a changed URL only, as on the page)."""
        url = self.cleaned_data.get("webhook_url", "")
        if self.instance.pk and url == self.instance.webhook_url:
            return url
        try:
            return services.clean_webhook_url(url)
        except ConfigError as exc:
            raise forms.ValidationError(exc.errors["webhook_url"]) from None


@admin.register(AlertSettings)
class AlertSettingsAdmin(admin.ModelAdmin):
    form = AlertSettingsForm
    list_display = ("user", "webhook_enabled", "email_enabled", "on_succeeded", "on_failed",
                    "on_cancelled", "include_stages", "updated")  # fmt: skip
    list_filter = ("webhook_enabled", "email_enabled")
    search_fields = ("user__username", "webhook_url", "email")
    raw_id_fields = ("user",)


@admin.register(AlertRule)
class AlertRuleAdmin(admin.ModelAdmin):
    list_display = ("__str__", "user", "metric", "comparison", "value", "tag", "enabled", "created")
    list_filter = ("comparison", "enabled")
    search_fields = ("user__username", "metric", "tag")
    raw_id_fields = ("user",)


class DeliveryInline(admin.TabularInline):
    model = Delivery
    fields = ("channel", "target", "status", "attempts", "last_error", "sent_at")
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Notification)
class NotificationAdmin(admin.ModelAdmin):
    list_display = ("__str__", "user", "event", "run", "rule", "created")
    list_filter = ("event",)
    search_fields = ("user__username", "text", "key")
    date_hierarchy = "created"
    fields = ("user", "event", "run", "rule", "key", "text", "payload", "created")
    readonly_fields = fields
    inlines = [DeliveryInline]

    def has_add_permission(self, request) -> bool:
        return False


@admin.register(Delivery)
class DeliveryAdmin(admin.ModelAdmin):
    list_display = ("__str__", "user", "channel", "target", "status", "attempts", "last_error",
                    "created", "sent_at")  # fmt: skip
    list_filter = ("status", "channel")
    search_fields = ("notification__user__username", "target", "last_error")
    list_select_related = ("notification", "notification__user")
    date_hierarchy = "created"
    fields = ("notification", "channel", "target", "status", "attempts", "history",
              "last_error", "next_attempt_at", "sent_at", "created", "updated")  # fmt: skip
    readonly_fields = fields
    actions = ["send_again"]

    def has_add_permission(self, request) -> bool:
        return False

    @admin.display(description="user")
    def user(self, obj: Delivery):
        return obj.notification.user

    @admin.action(description="Send the selected failed deliveries again", permissions=["change"])
    def send_again(self, request, queryset) -> None:
        count = services.resend(queryset.values_list("pk", flat=True))
        skipped = queryset.count() - count
        text = f"{count} delivery(ies) queued again."
        if skipped:
            text += f" {skipped} not failed, left as they are."
        self.message_user(request, text, messages.SUCCESS)
