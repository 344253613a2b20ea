"""Shapes of the runs API: what a request must look like and how objects are shown.

Request serializers check only the shape (types, known ids, objects where objects belong);
whether a config is valid, an input ready or a name free is decided by runs.services, whose
ConfigError the views turn into the same field-level 400 answers.
"""

from __future__ import annotations

from typing import Any

from django.urls import reverse
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from nanochat_site.limits import BoundedJSONDecoder
from runs import artifacts, probes, selectors, services
from runs import tags as tags_module
from runs.exports import MAX_EXPORT_NAMES, MAX_NAME_LENGTH
from runs.models import (
    Checkpoint,
    Dataset,
    EvalResult,
    Kind,
    Report,
    Run,
    RunEvent,
    Sample,
    Status,
    Tokenizer,
)
from runs.predictions import memory_prediction
from runs.programs import Program
from runs.series import DEFAULT_MAX_POINTS, MAX_POINTS_LIMIT
from runs.wandb_info import wandb_info

MAX_LOG_LINES = 5000
DEFAULT_LOG_LINES = 200
MAX_EVENTS = 5000
DEFAULT_EVENTS = 500


def _object(value: Any, field: str) -> dict:
    """JSON objects only: a list or a string where settings belong is a field error."""
    if not isinstance(value, dict):
        raise serializers.ValidationError(f"{field} must be an object of names to values")
    return value


class RefSerializer(serializers.Serializer):
    """A related object as {id, name}: enough to show it and to link to it."""

    id = serializers.IntegerField(source="pk")
    name = serializers.CharField(source="__str__")


# ---- programs -----------------------------------------------------------------------------


class FlagSerializer(serializers.Serializer):
    name = serializers.CharField()
    type = serializers.SerializerMethodField()
    default = serializers.JSONField()
    help = serializers.CharField()
    choices = serializers.ListField(child=serializers.JSONField(), allow_null=True)
    min = serializers.FloatField(allow_null=True)
    max = serializers.FloatField(allow_null=True)

    def get_type(self, flag) -> str:
        return flag.type.__name__


class ProgramSerializer(serializers.Serializer):
    kind = serializers.CharField()
    description = serializers.CharField()
    submit_via = serializers.CharField()
    inputs = serializers.ListField(child=serializers.CharField())
    distributed = serializers.BooleanField()
    resumable = serializers.BooleanField()
    presets = serializers.SerializerMethodField()
    flags = serializers.SerializerMethodField()
    sources = serializers.SerializerMethodField()

    def get_presets(self, program: Program) -> dict[str, dict[str, Any]]:
        return {name: program.flags.load_config_file(name) for name in program.flags.presets()}

    @extend_schema_field(FlagSerializer(many=True))
    def get_flags(self, program: Program):
        if program.kind == Kind.DATASET:
            return []  # a dataset's options depend on its source: see `sources`
        return FlagSerializer(program.user_flags(), many=True).data

    @extend_schema_field(serializers.DictField(child=FlagSerializer(many=True), allow_null=True))
    def get_sources(self, program: Program):
        if program.kind != Kind.DATASET:
            return None
        return {
            source: FlagSerializer(flags, many=True).data
            for source, flags in artifacts.dataset_source_flags().items()
        }


# ---- runs ---------------------------------------------------------------------------------


class RunFilterSerializer(serializers.Serializer):
    kind = serializers.ChoiceField(choices=Kind.choices, required=False)
    status = serializers.ChoiceField(choices=Status.choices, required=False)
    owner = serializers.CharField(required=False, help_text="username")
    mine = serializers.BooleanField(required=False, help_text="only my runs")
    search = serializers.CharField(required=False, help_text="part of the run's name")
    tag = serializers.CharField(required=False, help_text="one of the run's tags")


class RunNotesSerializer(serializers.Serializer):
    """PATCH /api/runs/<id>/: the run's tags and note; a field left out stays as it is.
    runs/tags.py decides what a tag may be (the same rules as the run page's form)."""

    tags = serializers.ListField(
        child=serializers.CharField(allow_blank=True, trim_whitespace=False),
        required=False,
        help_text=(
            f"replaces the run's tags: at most {tags_module.MAX_TAGS}, each trimmed and "
            f"lowercased, 1-{tags_module.TAG_MAX_LENGTH} letters, digits, spaces or - _ . : /"
        ),
    )
    note = serializers.CharField(
        required=False,
        allow_blank=True,
        trim_whitespace=False,
        max_length=tags_module.NOTE_MAX_LENGTH,
        help_text="markdown, shown escaped on the run page",
    )


class RunCreateSerializer(serializers.Serializer):
    kind = serializers.CharField(max_length=16)
    preset = serializers.CharField(max_length=100, required=False, allow_blank=True, default="")
    config = serializers.JSONField(
        required=False, default=dict, help_text="setting overrides", decoder=BoundedJSONDecoder
    )
    dataset = serializers.PrimaryKeyRelatedField(
        queryset=Dataset.objects.all(), required=False, allow_null=True
    )
    tokenizer = serializers.PrimaryKeyRelatedField(
        queryset=Tokenizer.objects.all(), required=False, allow_null=True
    )
    parent_checkpoint = serializers.PrimaryKeyRelatedField(
        queryset=Checkpoint.objects.all(), required=False, allow_null=True
    )
    nproc_per_node = serializers.IntegerField(required=False, default=1)
    name = serializers.CharField(max_length=200, required=False, allow_blank=True, default="")
    probe_prompts = serializers.ListField(
        child=serializers.CharField(max_length=probes.MAX_PROMPT_CHARS),
        max_length=probes.MAX_PROMPTS, required=False, default=list,
        help_text="prompts every checkpoint of the run answers (shown on the run page)",
    )  # fmt: skip

    def validate_config(self, value):
        return _object(value, "config")


MODEL_HELP = "model family: " + ", ".join(f"{n} ({label})" for n, label in selectors.families())


class RunSummarySerializer(serializers.ModelSerializer):
    owner = serializers.CharField(source="owner.username", allow_null=True, read_only=True)
    dataset = RefSerializer(read_only=True, allow_null=True)
    tokenizer = RefSerializer(read_only=True, allow_null=True)
    url = serializers.HyperlinkedIdentityField(view_name="runs-api:run-detail")
    model = serializers.SerializerMethodField(
        help_text=f"{MODEL_HELP}; null for dataset and tokenizer runs"
    )
    tags = serializers.SlugRelatedField(many=True, read_only=True, slug_field="name")

    class Meta:
        model = Run
        fields = [
            "id", "url", "name", "kind", "preset", "status", "owner", "dataset", "tokenizer",
            "model", "tags", "step", "total_steps", "progress", "eta_seconds", "best_val_bpb", "error",
            "created", "started_at", "finished_at",
        ]  # fmt: skip
        read_only_fields = fields

    def get_model(self, run: Run) -> str | None:
        if not hasattr(run, "model_family"):  # a list's page has them all set at once
            selectors.attach_families([run])
        return run.model_family


class MemorySerializer(serializers.Serializer):
    """runs.predictions.memory_prediction: the run's predicted memory per GPU."""

    text = serializers.CharField(help_text="e.g. '≈ 61 of 80 GiB per GPU (...), device batch 16'")
    fits = serializers.BooleanField()
    device_batch_size = serializers.IntegerField(allow_null=True)
    predicted_bytes = serializers.IntegerField(allow_null=True)
    capacity_bytes = serializers.IntegerField(allow_null=True)
    where = serializers.CharField(help_text="the GPU (or memory) the prediction is for")


class WandbSerializer(serializers.Serializer):
    """runs.wandb_info: where the run's Weights & Biases copy is (from its start event)."""

    project = serializers.CharField()
    group = serializers.CharField(required=False)
    mode = serializers.CharField(required=False, help_text="online, offline or disabled")
    run_id = serializers.CharField(required=False)
    url = serializers.URLField(required=False, help_text="the W&B run's page (online)")
    dir = serializers.CharField(required=False, help_text="its local directory on the worker")
    sync_command = serializers.CharField(required=False, help_text="uploads an offline run")
    error = serializers.CharField(required=False, help_text="why the run was not logged")


RUN_LINKS = ("metrics", "log", "events", "samples", "report", "cancel", "resume", "retry")


class RunDetailSerializer(RunSummarySerializer):
    parent_checkpoint = RefSerializer(read_only=True, allow_null=True)
    stage_runs = serializers.PrimaryKeyRelatedField(many=True, read_only=True)
    duration_seconds = serializers.FloatField(read_only=True, allow_null=True)
    counts = serializers.SerializerMethodField()
    can_manage = serializers.SerializerMethodField()
    links = serializers.SerializerMethodField()
    memory = serializers.SerializerMethodField(
        help_text="predicted peak memory per GPU of a training step (text: what a user reads)"
    )
    wandb = serializers.SerializerMethodField(
        help_text="the run's Weights & Biases copy; null when it does not log to W&B"
    )

    class Meta(RunSummarySerializer.Meta):
        fields = [
            *RunSummarySerializer.Meta.fields, "parent_checkpoint", "retry_of", "pipeline",
            "stage_runs", "note",
            "nproc_per_node", "overrides", "config", "probe_prompts", "resume_step", "attempts",
            "cancel_requested", "host", "worker", "pid", "heartbeat_at", "duration_seconds",
            "exit_code", "log_tail", "run_dir", "counts", "can_manage", "links", "memory",
            "wandb",
        ]  # fmt: skip
        read_only_fields = fields

    def get_counts(self, run: Run) -> dict[str, int]:
        return {
            "checkpoints": run.checkpoints.count(),
            "metric_points": run.metric_points.count(),
            "events": run.events_count,
            "samples": run.samples.count(),
        }

    def get_can_manage(self, run: Run) -> bool:
        return services.can_manage(self.context["request"].user, run)

    @extend_schema_field(MemorySerializer(allow_null=True))
    def get_memory(self, run: Run) -> dict[str, Any] | None:
        return memory_prediction(
            run.kind, run.config or {}, tokenizer=run.tokenizer,
            parent_checkpoint=run.parent_checkpoint, nproc_per_node=run.nproc_per_node,
        )  # fmt: skip

    @extend_schema_field(WandbSerializer(allow_null=True))
    def get_wandb(self, run: Run) -> dict[str, str] | None:
        return wandb_info(run)

    def get_links(self, run: Run) -> dict[str, str]:
        request = self.context["request"]
        return {
            name: request.build_absolute_uri(reverse(f"runs-api:run-{name}", args=[run.pk]))
            for name in RUN_LINKS
        }


class MetricsQuerySerializer(serializers.Serializer):
    names = serializers.CharField(
        required=False, help_text="comma-separated metric names (default: all)"
    )
    max_points = serializers.IntegerField(
        required=False, default=DEFAULT_MAX_POINTS, min_value=2, max_value=MAX_POINTS_LIMIT
    )
    after_step = serializers.IntegerField(required=False, help_text="only steps after this one")


class MetricsExportQuerySerializer(serializers.Serializer):
    names = serializers.CharField(
        required=False,
        max_length=(MAX_NAME_LENGTH + 1) * MAX_EXPORT_NAMES,
        help_text=f"comma-separated metric names the run has (default: all; at most "
        f"{MAX_EXPORT_NAMES}, each at most {MAX_NAME_LENGTH} characters)",
    )


class SeriesSerializer(serializers.Serializer):
    step = serializers.ListField(child=serializers.IntegerField())
    value = serializers.ListField(child=serializers.FloatField(allow_null=True))
    time = serializers.ListField(child=serializers.FloatField())
    total = serializers.IntegerField(help_text="points stored, before downsampling")


class MetricsSerializer(serializers.Serializer):
    run = serializers.IntegerField()
    names = serializers.ListField(child=serializers.CharField(), help_text="every metric name")
    series = serializers.DictField(child=SeriesSerializer())


class LogQuerySerializer(serializers.Serializer):
    lines = serializers.IntegerField(
        required=False, default=DEFAULT_LOG_LINES, min_value=1, max_value=MAX_LOG_LINES
    )


class LogSerializer(serializers.Serializer):
    lines = serializers.ListField(child=serializers.CharField(allow_blank=True))


class EventsQuerySerializer(serializers.Serializer):
    type = serializers.CharField(required=False, max_length=32)
    after = serializers.IntegerField(
        required=False, default=-1, help_text="only events with a larger seq"
    )
    limit = serializers.IntegerField(
        required=False, default=DEFAULT_EVENTS, min_value=1, max_value=MAX_EVENTS
    )


class EventSerializer(serializers.ModelSerializer):
    class Meta:
        model = RunEvent
        fields = ["seq", "type", "time", "step", "data"]


class EventsSerializer(serializers.Serializer):
    events = EventSerializer(many=True)
    next_after = serializers.IntegerField(help_text="pass as `after` to get what follows")


class SampleSerializer(serializers.ModelSerializer):
    class Meta:
        model = Sample
        fields = ["id", "step", "prompt", "completion", "created"]


class SamplesSerializer(serializers.Serializer):
    run = serializers.IntegerField()
    samples = SampleSerializer(many=True)


class ReportSerializer(serializers.ModelSerializer):
    class Meta:
        model = Report
        fields = ["id", "run", "section", "markdown", "created"]


class RunReportSerializer(serializers.Serializer):
    run = serializers.IntegerField()
    markdown = serializers.CharField(allow_blank=True, help_text="every section, in order")
    sections = ReportSerializer(many=True)


# ---- datasets and tokenizers --------------------------------------------------------------


class ArtifactSerializer(serializers.ModelSerializer):
    owner = serializers.CharField(source="owner.username", allow_null=True, read_only=True)
    run = serializers.IntegerField(
        source="build_run", read_only=True, allow_null=True, help_text="the run that builds it"
    )
    can_manage = serializers.SerializerMethodField()

    def get_can_manage(self, obj) -> bool:
        return artifacts.can_manage(self.context["request"].user, obj)


class DatasetSerializer(ArtifactSerializer):
    class Meta:
        model = Dataset
        fields = [
            "id", "name", "owner", "source", "options", "path", "status", "shards", "documents",
            "characters", "bytes_on_disk", "created", "run", "can_manage",
        ]  # fmt: skip
        read_only_fields = fields


class DatasetCreateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=100)
    source = serializers.CharField(
        max_length=16, help_text=f"one of {', '.join(services.DATASET_SOURCES)}"
    )
    options = serializers.JSONField(
        required=False, default=dict, help_text="flags of the source's command (see programs)",
        decoder=BoundedJSONDecoder,
    )  # fmt: skip
    path = serializers.CharField(
        required=False, allow_blank=True, default="", help_text="for source 'path'"
    )
    files = serializers.ListField(
        child=serializers.FileField(), required=False, default=list,
        help_text="for source 'upload' (multipart): .txt, .jsonl or .parquet files",
    )  # fmt: skip

    def validate_options(self, value):
        return _object(value, "options")


class TokenizerSerializer(ArtifactSerializer):
    dataset = RefSerializer(read_only=True, allow_null=True)

    class Meta:
        model = Tokenizer
        fields = [
            "id", "name", "owner", "dataset", "path", "status", "vocab_size", "stats", "created",
            "run", "can_manage",
        ]  # fmt: skip
        read_only_fields = fields


class TokenizerCreateSerializer(serializers.Serializer):
    name = serializers.CharField(
        max_length=100, required=False, allow_blank=True, default="",
        help_text="default: <dataset>-<vocab_size>-<run id>",
    )  # fmt: skip
    dataset = serializers.PrimaryKeyRelatedField(
        queryset=Dataset.objects.all(), required=False, allow_null=True
    )
    config = serializers.JSONField(
        required=False, default=dict, help_text="vocab_size, max_chars, doc_cap",
        decoder=BoundedJSONDecoder,
    )  # fmt: skip

    def validate_config(self, value):
        return _object(value, "config")


# ---- outputs ------------------------------------------------------------------------------


class CheckpointFilterSerializer(serializers.Serializer):
    stage = serializers.ChoiceField(choices=Checkpoint.Stage.choices, required=False)
    model = serializers.ChoiceField(
        choices=[name for name, _ in selectors.families()], required=False, help_text=MODEL_HELP
    )
    run = serializers.IntegerField(required=False)
    tokenizer = serializers.IntegerField(required=False)


class CheckpointSerializer(serializers.ModelSerializer):
    tokenizer = RefSerializer(read_only=True, allow_null=True)
    depth = serializers.IntegerField(read_only=True, allow_null=True)
    model = serializers.SerializerMethodField(help_text=MODEL_HELP)

    class Meta:
        model = Checkpoint
        fields = [
            "id", "run", "tokenizer", "stage", "step", "path", "model", "depth", "model_config",
            "val_bpb", "size_bytes", "created",
        ]  # fmt: skip

    def get_model(self, checkpoint: Checkpoint) -> str:
        return selectors.checkpoint_family(checkpoint)


class LineageStepSerializer(serializers.Serializer):
    checkpoint = CheckpointSerializer()
    scores = serializers.DictField(
        child=serializers.FloatField(allow_null=True),
        help_text="score per task (leaderboard column, e.g. CORE, GSM8K)",
    )
    deltas = serializers.DictField(
        child=serializers.FloatField(allow_null=True),
        help_text="change per task from the step before (empty for the first step)",
    )
    val_bpb_delta = serializers.FloatField(allow_null=True)


class LineageSerializer(serializers.Serializer):
    checkpoint = serializers.IntegerField(source="checkpoint.pk")
    tasks = serializers.ListField(child=serializers.CharField())
    steps = LineageStepSerializer(many=True, help_text="root (base) first, this checkpoint last")
    children = CheckpointSerializer(
        many=True, help_text="the latest checkpoint of each run fine-tuned from this one"
    )
    truncated = serializers.BooleanField(
        help_text="the chain goes on past the depth shown, or loops back on itself"
    )


class EvalFilterSerializer(serializers.Serializer):
    task = serializers.CharField(required=False, max_length=64)
    run = serializers.IntegerField(required=False)
    checkpoint = serializers.IntegerField(required=False)


class EvalResultSerializer(serializers.ModelSerializer):
    class Meta:
        model = EvalResult
        fields = [
            "id", "run", "checkpoint", "task", "metric", "value", "details", "data_source",
            "created",
        ]  # fmt: skip


class ReportFilterSerializer(serializers.Serializer):
    run = serializers.IntegerField(required=False)
