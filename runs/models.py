"""What the web app records about training: inputs, runs, their numbers and their outputs.

The training programs know nothing of these tables. A run's Celery task launches a program and
turns the lines of its event file into rows here (runs/ingest.py); datasets, tokenizers and
checkpoints are the directories those programs wrote, recorded with enough metadata to pick
them as inputs of the next stage and to show them on the dashboard.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from django.conf import settings
from django.db import models
from django.utils import timezone


class Kind(models.TextChoices):
    DATASET = "dataset", "dataset"
    TOKENIZER = "tokenizer", "tokenizer"
    BASE = "base", "base pretraining"
    MID = "mid", "mid-training"
    SFT = "sft", "supervised fine-tuning"
    RL = "rl", "reinforcement learning"
    BASE_EVAL = "base_eval", "base model evaluation"
    CHAT_EVAL = "chat_eval", "chat model evaluation"
    PIPELINE = "pipeline", "whole pipeline"


class Status(models.TextChoices):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE_STATUSES = (Status.QUEUED, Status.RUNNING)
FINISHED_STATUSES = (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED)


class ArtifactStatus(models.TextChoices):
    """Datasets and tokenizers are built by a run; they are usable once it succeeded."""

    BUILDING = "building"
    READY = "ready"
    FAILED = "failed"


class Dataset(models.Model):
    class Source(models.TextChoices):
        BUILTIN = "builtin", "built-in corpus"
        DOWNLOAD = "download", "download"
        UPLOAD = "upload", "uploaded files"
        PATH = "path", "existing directory"

    name = models.CharField(max_length=100, unique=True)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
        related_name="datasets",
    )  # fmt: skip
    source = models.CharField(max_length=16, choices=Source.choices)
    options = models.JSONField(default=dict, blank=True)
    path = models.CharField(max_length=500)
    status = models.CharField(
        max_length=16, choices=ArtifactStatus.choices, default=ArtifactStatus.BUILDING
    )
    shards = models.PositiveIntegerField(null=True, blank=True)
    documents = models.BigIntegerField(null=True, blank=True)
    characters = models.BigIntegerField(null=True, blank=True)
    bytes_on_disk = models.BigIntegerField(null=True, blank=True)
    created = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created", "-id"]

    def __str__(self) -> str:
        return self.name


class Tokenizer(models.Model):
    name = models.CharField(max_length=100, unique=True)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
        related_name="tokenizers",
    )  # fmt: skip
    dataset = models.ForeignKey(
        Dataset, null=True, blank=True, on_delete=models.PROTECT, related_name="tokenizers"
    )
    path = models.CharField(max_length=500)
    status = models.CharField(
        max_length=16, choices=ArtifactStatus.choices, default=ArtifactStatus.BUILDING
    )
    vocab_size = models.PositiveIntegerField()
    # Compression ratios from the tokenizer evaluation ({"bytes_per_token/news": 4.1, ...}).
    stats = models.JSONField(default=dict, blank=True)
    created = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created", "-id"]

    def __str__(self) -> str:
        return self.name


class Tag(models.Model):
    """A label on runs ("baseline", "ablation:lr"), normalized by runs/tags.py.

    A table of its own rather than a JSON list on Run: filtering a JSON list by one of its
    items (`contains`) is not supported on SQLite, the default database."""

    name = models.CharField(max_length=40, unique=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Run(models.Model):
    name = models.CharField(max_length=200, blank=True)
    kind = models.CharField(max_length=16, choices=Kind.choices)
    preset = models.CharField(max_length=100, blank=True)
    # What the user asked for (preset + overrides, validated) and what the program was given.
    overrides = models.JSONField(default=dict, blank=True)
    config = models.JSONField(default=dict, blank=True)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
        related_name="runs",
    )  # fmt: skip
    dataset = models.ForeignKey(
        Dataset, null=True, blank=True, on_delete=models.PROTECT, related_name="runs"
    )
    tokenizer = models.ForeignKey(
        Tokenizer, null=True, blank=True, on_delete=models.PROTECT, related_name="runs"
    )
    parent_checkpoint = models.ForeignKey(
        "Checkpoint", null=True, blank=True, on_delete=models.PROTECT, related_name="child_runs"
    )
    retry_of = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="retries"
    )
    # A stage of a pipeline run (each stage is a run of its own, shown and charted as one).
    pipeline = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.CASCADE, related_name="stage_runs"
    )
    nproc_per_node = models.PositiveSmallIntegerField(default=1)
    # Set by "resume": the program continues from this saved step of the run's checkpoints.
    resume_step = models.IntegerField(null=True, blank=True)

    status = models.CharField(
        max_length=16, choices=Status.choices, default=Status.QUEUED, db_index=True
    )
    # A new token per launch: a stale broker message for an earlier launch is ignored.
    launch_token = models.UUIDField(default=uuid.uuid4)
    attempts = models.PositiveSmallIntegerField(default=0)
    cancel_requested = models.BooleanField(default=False)
    host = models.CharField(max_length=255, blank=True)
    worker = models.CharField(max_length=255, blank=True)
    pid = models.IntegerField(null=True, blank=True)
    created = models.DateTimeField(default=timezone.now, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    exit_code = models.IntegerField(null=True, blank=True)
    error = models.TextField(blank=True)
    log_tail = models.TextField(blank=True)

    step = models.IntegerField(default=0)
    total_steps = models.IntegerField(null=True, blank=True)
    progress = models.FloatField(default=0.0)  # 0..1
    eta_seconds = models.FloatField(null=True, blank=True)
    best_val_bpb = models.FloatField(null=True, blank=True)
    run_dir = models.CharField(max_length=500, blank=True)
    # How far the event file has been read (bytes) and how many events were stored.
    events_offset = models.BigIntegerField(default=0)
    events_count = models.IntegerField(default=0)
    # Prompts every saved checkpoint answers, so the run page shows the model learning to
    # speak (runs/probes.py); [] for none.
    probe_prompts = models.JSONField(default=list, blank=True)
    # What the owner says about the run: labels to find it by and a markdown note.
    tags = models.ManyToManyField(Tag, blank=True, related_name="runs")
    note = models.TextField(blank=True)

    class Meta:
        ordering = ["-created", "-id"]
        indexes = [models.Index(fields=["kind", "status"])]

    def __str__(self) -> str:
        # Unnamed runs read as their kind does on every page ("base model evaluation 12").
        return self.name or f"{self.get_kind_display()} {self.pk}"

    @property
    def is_active(self) -> bool:
        return self.status in ACTIVE_STATUSES

    @property
    def directory(self) -> Path:
        return Path(self.run_dir)

    @property
    def duration_seconds(self) -> float | None:
        if self.started_at is None:
            return None
        return ((self.finished_at or timezone.now()) - self.started_at).total_seconds()

    def mark_artifacts(self) -> None:
        """A dataset/tokenizer run's artifact follows the run: ready when it succeeded."""
        status = {
            Status.SUCCEEDED: ArtifactStatus.READY,
            Status.FAILED: ArtifactStatus.FAILED,
            Status.CANCELLED: ArtifactStatus.FAILED,
        }.get(self.status, ArtifactStatus.BUILDING)
        if self.kind == Kind.DATASET and self.dataset_id:
            Dataset.objects.filter(pk=self.dataset_id).update(status=status)
        elif self.kind == Kind.TOKENIZER and self.tokenizer_id:
            Tokenizer.objects.filter(pk=self.tokenizer_id).update(status=status)


class RunEvent(models.Model):
    """Every event of the run's event file, in order (metrics also land in MetricPoint)."""

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="events")
    seq = models.IntegerField()
    type = models.CharField(max_length=32)
    time = models.FloatField()
    step = models.IntegerField(null=True, blank=True)
    data = models.JSONField(default=dict)

    class Meta:
        ordering = ["run", "seq"]
        constraints = [models.UniqueConstraint(fields=["run", "seq"], name="run_event_seq")]
        indexes = [models.Index(fields=["run", "type", "seq"])]

    def __str__(self) -> str:
        return f"{self.type} #{self.seq} (run {self.run_id})"


class MetricPoint(models.Model):
    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="metric_points")
    name = models.CharField(max_length=64)
    step = models.IntegerField()
    value = models.FloatField(null=True)  # null: the program reported NaN or infinity
    time = models.FloatField()  # Unix seconds, for a wall-clock x-axis

    class Meta:
        # Range reads are "one run, one name, steps in order".
        indexes = [models.Index(fields=["run", "name", "step"], name="metric_run_name_step")]

    def __str__(self) -> str:
        return f"{self.name}@{self.step} = {self.value}"


class Checkpoint(models.Model):
    class Stage(models.TextChoices):
        BASE = "base"
        MID = "mid"
        SFT = "sft"
        RL = "rl"

    run = models.ForeignKey(
        Run, null=True, blank=True, on_delete=models.CASCADE, related_name="checkpoints"
    )
    tokenizer = models.ForeignKey(
        Tokenizer, null=True, blank=True, on_delete=models.SET_NULL, related_name="checkpoints"
    )
    stage = models.CharField(max_length=8, choices=Stage.choices)
    step = models.IntegerField()
    path = models.CharField(max_length=500)  # the checkpoint directory (all steps)
    # Who imported it (manage.py import_checkpoint); a run's checkpoints belong to the run's
    # owner and leave this empty.
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
        related_name="imported_checkpoints",
    )  # fmt: skip
    model_config = models.JSONField(default=dict, blank=True)
    val_bpb = models.FloatField(null=True, blank=True)
    size_bytes = models.BigIntegerField(null=True, blank=True)
    created = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created", "-id"]
        constraints = [
            models.UniqueConstraint(fields=["path", "step"], name="checkpoint_path_step")
        ]

    def __str__(self) -> str:
        run = f"run {self.run_id} " if self.run_id else ""
        return f"{self.stage} {run}step {self.step}"

    @property
    def depth(self) -> int | None:
        return self.model_config.get("n_layer")


class EvalResult(models.Model):
    class DataSource(models.TextChoices):
        """What the score was measured on (the event file's `data_source`, training/events.py):
        an offline score only shows that the pipeline works, it is not comparable with
        published numbers. Blank: recorded before programs reported it."""

        OFFLINE = "offline", "offline sample data"
        HUB = "hub", "benchmark data"

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="eval_results")
    checkpoint = models.ForeignKey(
        Checkpoint, null=True, blank=True, on_delete=models.CASCADE, related_name="eval_results"
    )
    task = models.CharField(max_length=64, db_index=True)
    metric = models.CharField(max_length=64)
    value = models.FloatField(null=True)
    details = models.JSONField(default=dict, blank=True)
    data_source = models.CharField(max_length=8, choices=DataSource.choices, blank=True)
    created = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["task", "metric", "-created"]

    def __str__(self) -> str:
        return f"{self.task} {self.metric} = {self.value}"


class Sample(models.Model):
    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="samples")
    step = models.IntegerField()
    prompt = models.TextField()
    completion = models.TextField()
    created = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["run", "step", "id"]

    def __str__(self) -> str:
        return f"sample at step {self.step} (run {self.run_id})"


class ProbeAnswer(models.Model):
    """One checkpoint's answer to one of its run's probe prompts (runs/probes.py).

    An engine worker answers after the checkpoint is saved; `error` says why one could not
    (no engine worker, say), so the page shows a gap with its reason instead of nothing."""

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="probe_answers")
    checkpoint = models.ForeignKey(
        Checkpoint, on_delete=models.CASCADE, related_name="probe_answers"
    )
    step = models.IntegerField()
    index = models.PositiveSmallIntegerField()  # which of the run's probe prompts
    prompt = models.TextField()  # as it was asked (the run's list may change later)
    text = models.TextField(blank=True)
    error = models.TextField(blank=True)
    created = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["run", "step", "index"]
        constraints = [
            models.UniqueConstraint(fields=["checkpoint", "index"], name="probe_answer_index")
        ]

    def __str__(self) -> str:
        return f"probe {self.index} at step {self.step} (run {self.run_id})"


class Report(models.Model):
    """One markdown section of a run's report; the run's report is its sections in order."""

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="reports")
    section = models.CharField(max_length=200)
    markdown = models.TextField()
    created = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["run", "id"]

    def __str__(self) -> str:
        return f"{self.section} (run {self.run_id})"
