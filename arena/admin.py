"""Admin for arena battles and votes: audit what was compared, what each model said, the vote.

Votes are read-only here too: a rating must rest on what users actually chose."""

from django.contrib import admin

from arena.models import Battle, Vote


class VoteInline(admin.StackedInline):
    model = Vote
    extra = 0
    fields = ("outcome", "created")
    readonly_fields = fields
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(Battle)
class BattleAdmin(admin.ModelAdmin):
    list_display = ("id", "owner", "status", "label_a", "label_b", "outcome", "created")
    list_filter = ("status", "vote__outcome", "created")
    search_fields = ("prompt", "owner__username", "label_a", "label_b")
    list_select_related = ("owner", "vote")
    raw_id_fields = ("owner", "checkpoint_a", "checkpoint_b")
    readonly_fields = ("created",)
    inlines = [VoteInline]

    @admin.display(description="vote")
    def outcome(self, battle):
        vote = getattr(battle, "vote", None)
        return vote.outcome if vote else "—"


@admin.register(Vote)
class VoteAdmin(admin.ModelAdmin):
    list_display = ("id", "battle", "outcome", "created")
    list_filter = ("outcome",)
    raw_id_fields = ("battle",)

    def has_change_permission(self, request, obj=None):
        return False

    def has_add_permission(self, request):
        return False
