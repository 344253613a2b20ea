"""The Django admin for everything the runs app records.

The admin is for looking and for the few actions an operator needs (cancel a run); it does not
create runs or artifacts, because those go through runs/services.py, which validates them and
queues their work. What the worker writes (status, progress, metrics, checkpoints, events) is
read-only here so an edit in the admin cannot contradict the event file.

RunEvent and MetricPoint grow by millions of rows; their pages never count the whole table
(see CappedCountPaginator), join nothing per row and offer only filters that need no scan.
"""

from __future__ import annotations

from pathlib import Path

from django.contrib import admin, messages
from django.core.paginator import Paginator
from django.template.defaultfilters import filesizeformat, truncatechars
from django.urls import reverse
from django.utils.functional import cached_property
from django.utils.html import format_html, format_html_join

from runs import selectors, services
from runs.files import SERVED_FILES
from runs.models import (
    Checkpoint,
    Dataset,
    EvalResult,
    MetricPoint,
    ProbeAnswer,
    Report,
    Run,
    RunEvent,
    Sample,
    Status,
    Tokenizer,
)
from training.events import KNOWN_TYPES

EMPTY = "—"


# ---- display helpers ------------------------------------------------------------------------


def human_duration(seconds: float | None) -> str:
    """'3h 04m', '2m 05s', '41s': enough precision to compare runs at a glance."""
    if seconds is None:
        return EMPTY
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def human_size(size: int | None) -> str:
    return EMPTY if size is None else filesizeformat(size)


def bpb(value: float | None) -> str:
    return EMPTY if value is None else f"{value:.4f}"


def admin_link(obj, text: str | None = None) -> str:
    """A link to an object's admin change page (the id when there is no object)."""
    if obj is None:
        return EMPTY
    meta = obj._meta
    url = reverse(f"admin:{meta.app_label}_{meta.model_name}_change", args=[obj.pk])
    return format_html('<a href="{}">{}</a>', url, text or str(obj))


def run_link(run_id: int | None) -> str:
    """A link to a run by id alone, so list rows need no join to the runs table."""
    if run_id is None:
        return EMPTY
    url = reverse("admin:runs_run_change", args=[run_id])
    return format_html('<a href="{}">run {}</a>', url, run_id)


class CappedCountPaginator(Paginator):
    """Counts at most `cap` rows.

    The changelist asks its paginator for a count on every page view; COUNT(*) over millions
    of metric points takes seconds on PostgreSQL and longer on SQLite. Counting a LIMITed
    subquery costs at most `cap` index entries; filter by run to page through the rest.
    """

    cap = 10_000

    @cached_property
    def count(self) -> int:
        return self.object_list[: self.cap].count()


class BigTableAdmin(admin.ModelAdmin):
    """View-only pages over tables the ingestion fills, sized for millions of rows."""

    show_full_result_count = False
    raw_id_fields = ("run",)
    count_cap = CappedCountPaginator.cap

    def get_paginator(self, request, queryset, per_page, orphans=0, allow_empty_first_page=True):
        paginator = CappedCountPaginator(queryset, per_page, orphans, allow_empty_first_page)
        paginator.cap = self.count_cap
        return paginator

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    @admin.display(description="run", ordering="run_id")
    def run_ref(self, obj) -> str:
        return run_link(obj.run_id)


class WorkerWrittenAdmin(admin.ModelAdmin):
    """Rows a run's program produced: viewable and deletable, never added or edited here."""

    raw_id_fields = ("run",)
    list_select_related = ("run",)

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    @admin.display(description="run", ordering="run")
    def run_ref(self, obj) -> str:
        return admin_link(obj.run)


# ---- inputs -----------------------------------------------------------------------------------


@admin.register(Dataset)
class DatasetAdmin(admin.ModelAdmin):
    """Datasets are created (and built) through the API or pages, which queue the build run."""

    list_display = ("name", "source", "status", "owner", "shards", "documents", "characters",
                    "size", "created")  # fmt: skip
    list_filter = ("status", "source")
    search_fields = ("name", "path", "owner__username")
    list_select_related = ("owner",)
    raw_id_fields = ("owner",)
    date_hierarchy = "created"
    readonly_fields = ("source", "options", "path", "status", "shards", "documents",
                       "characters", "bytes_on_disk", "size", "created")  # fmt: skip

    def has_add_permission(self, request) -> bool:
        return False

    @admin.display(description="size on disk", ordering="bytes_on_disk")
    def size(self, obj: Dataset) -> str:
        return human_size(obj.bytes_on_disk)


@admin.register(Tokenizer)
class TokenizerAdmin(admin.ModelAdmin):
    """Tokenizers are trained by a tokenizer run (services.create_tokenizer)."""

    list_display = ("name", "vocab_size", "dataset", "status", "owner", "created")
    list_filter = ("status",)
    search_fields = ("name", "path", "dataset__name", "owner__username")
    list_select_related = ("owner", "dataset")
    raw_id_fields = ("owner",)
    date_hierarchy = "created"
    readonly_fields = ("dataset", "path", "status", "vocab_size", "stats", "created")

    def has_add_permission(self, request) -> bool:
        return False


# ---- runs -------------------------------------------------------------------------------------


class CheckpointInline(admin.TabularInline):
    model = Checkpoint
    fk_name = "run"
    fields = ("link", "stage", "step", "val_bpb", "size", "path")
    readonly_fields = fields
    extra = 0
    can_delete = False
    ordering = ("step",)

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    @admin.display(description="checkpoint")
    def link(self, obj: Checkpoint) -> str:
        return admin_link(obj, f"step {obj.step}")

    @admin.display(description="size")
    def size(self, obj: Checkpoint) -> str:
        return human_size(obj.size_bytes)


class ReportInline(admin.TabularInline):
    model = Report
    fields = ("section", "preview", "created")
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    @admin.display(description="markdown")
    def preview(self, obj: Report) -> str:
        return truncatechars(obj.markdown, 120)


@admin.register(Run)
class RunAdmin(admin.ModelAdmin):
    """Runs are submitted through runs/services.py; here they are watched and cancelled.

    Deleting is left to services.delete_run (API and pages): it refuses active runs, keeps
    checkpoints other runs started from and removes the run directory, and it does not build
    the admin's list of every metric point it would cascade to.
    """

    list_display = ("id", "__str__", "kind", "family", "status", "owner", "progress_pct", "steps",
                    "best_bpb", "duration", "created")  # fmt: skip
    list_display_links = ("id", "__str__")
    list_filter = (
        "status",
        "kind",
        "cancel_requested",
        ("owner", admin.RelatedOnlyFieldListFilter),
    )
    search_fields = ("name", "preset", "host", "worker", "error", "owner__username")
    list_select_related = ("owner",)
    raw_id_fields = ("owner",)
    date_hierarchy = "created"
    actions = ("cancel_runs",)
    inlines = (CheckpointInline, ReportInline)
    fieldsets = (
        (None, {"fields": ("name", "owner", "kind", "preset", "status", "cancel_requested")}),
        ("Inputs", {"fields": ("dataset", "tokenizer", "parent_checkpoint", "retry_of",
                               "nproc_per_node", "resume_step")}),
        ("Configuration", {"fields": ("overrides", "config")}),
        ("Progress", {"fields": ("steps", "progress_pct", "eta", "best_bpb", "events_count",
                                 "events_offset", "recorded")}),
        ("Execution", {"fields": ("host", "worker", "pid", "attempts", "launch_token",
                                  "created", "started_at", "heartbeat_at", "finished_at",
                                  "duration", "exit_code", "error")}),
        ("Files", {"fields": ("run_dir", "files", "log_tail")}),
    )  # fmt: skip
    # Only the name and the owner are the operator's; everything else is the submission or
    # what the worker recorded.
    readonly_fields = tuple(
        name
        for _, options in fieldsets
        for name in options["fields"]
        if name not in ("name", "owner")
    )

    def has_add_permission(self, request) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    def get_search_results(self, request, queryset, search_term):
        """A number finds the run with that id too (people quote run ids)."""
        found, may_have_duplicates = super().get_search_results(request, queryset, search_term)
        if search_term.strip().isdigit():
            found |= queryset.filter(pk=int(search_term.strip()))
        return found, may_have_duplicates

    @admin.display(description="model")
    def family(self, obj: Run) -> str:
        return selectors.family_label(selectors.run_family(obj)) or "-"

    @admin.display(description="progress", ordering="progress")
    def progress_pct(self, obj: Run) -> str:
        return f"{obj.progress * 100:.0f}%"

    @admin.display(description="step", ordering="step")
    def steps(self, obj: Run) -> str:
        return f"{obj.step} / {obj.total_steps}" if obj.total_steps else str(obj.step)

    @admin.display(description="best val bpb", ordering="best_val_bpb")
    def best_bpb(self, obj: Run) -> str:
        return bpb(obj.best_val_bpb)

    @admin.display(description="duration")
    def duration(self, obj: Run) -> str:
        return human_duration(obj.duration_seconds)

    @admin.display(description="ETA")
    def eta(self, obj: Run) -> str:
        return human_duration(obj.eta_seconds) if obj.is_active else EMPTY

    @admin.display(description="recorded rows")
    def recorded(self, obj: Run) -> str:
        """Links to the run's events and metric points, filtered (never counted here)."""
        links = [
            (reverse(f"admin:runs_{model}_changelist") + f"?run__id__exact={obj.pk}", label)
            for model, label in (("runevent", "events"), ("metricpoint", "metric points"),
                                 ("sample", "samples"), ("evalresult", "eval results"))
        ]  # fmt: skip
        return format_html_join(" · ", '<a href="{}">{}</a>', links)

    @admin.display(description="files")
    def files(self, obj: Run) -> str:
        if not obj.run_dir:
            return EMPTY
        present = [name for name in SERVED_FILES if (Path(obj.run_dir) / name).is_file()]
        if not present:
            return "none yet"
        return format_html_join(
            " · ",
            '<a href="{}" target="_blank">{}</a>',
            ((reverse("run-file", args=[obj.pk, name]), name) for name in present),
        )

    @admin.action(description="Cancel selected runs", permissions=["change"])
    def cancel_runs(self, request, queryset) -> None:
        """Cancel each run through the service, reporting one message per run."""
        for run in queryset.order_by("pk"):
            try:
                run = services.cancel_run(run, request.user)
            except (services.Conflict, services.PermissionDenied) as exc:
                self.message_user(request, f"Run {run.pk}: {exc}", messages.WARNING)
                continue
            if run.status == Status.CANCELLED:
                text = f"Run {run.pk}: cancelled."
            else:
                text = f"Run {run.pk}: cancel requested; its worker stops it."
            self.message_user(request, text, messages.SUCCESS)


@admin.register(Checkpoint)
class CheckpointAdmin(admin.ModelAdmin):
    """Checkpoints are recorded from a run's checkpoint events; their files stay where saved."""

    list_display = ("__str__", "stage", "family", "run_ref", "step", "val", "depth", "size",
                    "tokenizer", "created")  # fmt: skip
    list_filter = ("stage",)
    search_fields = ("path", "run__name", "tokenizer__name")
    list_select_related = ("tokenizer",)
    raw_id_fields = ("run", "tokenizer")
    date_hierarchy = "created"
    fields = ("run", "tokenizer", "stage", "step", "directory", "model_config", "val_bpb",
              "size", "created", "used_by")  # fmt: skip
    readonly_fields = fields

    def has_add_permission(self, request) -> bool:
        return False

    @admin.display(description="run", ordering="run")
    def run_ref(self, obj: Checkpoint) -> str:
        return run_link(obj.run_id)

    @admin.display(description="model")
    def family(self, obj: Checkpoint) -> str:
        return selectors.family_label(selectors.checkpoint_family(obj))

    @admin.display(description="val bpb", ordering="val_bpb")
    def val(self, obj: Checkpoint) -> str:
        return bpb(obj.val_bpb)

    @admin.display(description="depth")
    def depth(self, obj: Checkpoint) -> str:
        return EMPTY if obj.depth is None else str(obj.depth)

    @admin.display(description="size", ordering="size_bytes")
    def size(self, obj: Checkpoint) -> str:
        return human_size(obj.size_bytes)

    @admin.display(description="checkpoint directory")
    def directory(self, obj: Checkpoint) -> str:
        missing = "" if Path(obj.path).is_dir() else " (missing on this machine)"
        return f"{obj.path}{missing}"

    @admin.display(description="runs started from it")
    def used_by(self, obj: Checkpoint) -> str:
        children = list(obj.child_runs.order_by("pk")[:20])
        if not children:
            return EMPTY
        return format_html_join(", ", "{}", ((admin_link(run),) for run in children))


# ---- what runs produced -----------------------------------------------------------------------


@admin.register(EvalResult)
class EvalResultAdmin(WorkerWrittenAdmin):
    list_display = ("task", "metric", "value", "run_ref", "checkpoint", "created")
    list_filter = ("task", "metric")
    search_fields = ("task", "metric", "run__name")
    list_select_related = ("run", "checkpoint")
    raw_id_fields = ("run", "checkpoint")


@admin.register(Sample)
class SampleAdmin(WorkerWrittenAdmin):
    list_display = ("id", "run_ref", "step", "prompt_preview", "completion_preview", "created")
    list_filter = (("run", admin.RelatedOnlyFieldListFilter),)
    search_fields = ("prompt", "completion")
    show_full_result_count = False

    @admin.display(description="prompt")
    def prompt_preview(self, obj: Sample) -> str:
        return truncatechars(obj.prompt, 60)

    @admin.display(description="completion")
    def completion_preview(self, obj: Sample) -> str:
        return truncatechars(obj.completion, 100)


@admin.register(ProbeAnswer)
class ProbeAnswerAdmin(WorkerWrittenAdmin):
    list_display = ("id", "run_ref", "step", "index", "prompt_preview", "text_preview", "error")
    list_filter = (("run", admin.RelatedOnlyFieldListFilter),)
    raw_id_fields = ("run", "checkpoint")
    search_fields = ("prompt", "text")

    @admin.display(description="prompt")
    def prompt_preview(self, obj: ProbeAnswer) -> str:
        return truncatechars(obj.prompt, 60)

    @admin.display(description="answer")
    def text_preview(self, obj: ProbeAnswer) -> str:
        return truncatechars(obj.text, 100)


@admin.register(Report)
class ReportAdmin(WorkerWrittenAdmin):
    list_display = ("section", "run_ref", "created")
    search_fields = ("section", "markdown", "run__name")


class EventTypeFilter(admin.SimpleListFilter):
    """Event types from the event-file contract, so the sidebar needs no DISTINCT scan."""

    title = "type"
    parameter_name = "type"

    def lookups(self, request, model_admin):
        return [(name, name) for name in KNOWN_TYPES]

    def queryset(self, request, queryset):
        return queryset.filter(type=self.value()) if self.value() else queryset


@admin.register(RunEvent)
class RunEventAdmin(BigTableAdmin):
    list_display = ("seq", "run_ref", "type", "step", "time", "preview")
    list_filter = ("run", EventTypeFilter)
    ordering = ("-run_id", "-seq")  # the (run, seq) unique index, newest run first

    @admin.display(description="data")
    def preview(self, obj: RunEvent) -> str:
        return truncatechars(str(obj.data), 100)


@admin.register(MetricPoint)
class MetricPointAdmin(BigTableAdmin):
    list_display = ("id", "run_ref", "name", "step", "value", "time")
    list_filter = ("run",)
    # Prefix search ("val/") rather than substring, so the (run, name, step) index can serve it.
    search_fields = ("^name",)
