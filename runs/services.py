"""Submitting, cancelling, resuming, retrying and deleting runs, and creating their artifacts.

The API, the pages, the admin and the command-line client all call these functions, so a rule
(who may cancel, what a valid config is, what a resume does) lives in exactly one place. Bad
input raises ConfigError with one message per field; nothing is written in that case.
"""

from __future__ import annotations

import shutil
import unicodedata
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from runs import broadcast, layout, probes, signals
from runs import tags as tags_module
from runs.follow import catch_up
from runs.models import (
    ACTIVE_STATUSES,
    ArtifactStatus,
    Checkpoint,
    Dataset,
    Kind,
    Run,
    Status,
    Tag,
    Tokenizer,
)
from runs.programs import Program, program_for, url_errors
from runs.tasks import execute_run
from training import dataset as dataset_program
from training.flags import ConfigError

MAX_NPROC = 64
# How each dataset source is built: the `training.dataset` command that does it.
DATASET_SOURCES = {
    "builtin": "builtin",
    "download": "download",
    "upload": "import",
    "path": "stats",
}
UPLOAD_SUFFIXES = (".txt", ".jsonl", ".parquet")
NAME_LENGTH = 100


class PermissionDenied(Exception):
    """The user may not do this to this object (the API answers 403)."""


class Conflict(Exception):
    """The object is not in a state that allows this (the API answers 409)."""


# ---- small helpers ------------------------------------------------------------------------


data_home = layout.data_home


def can_manage(user, obj: Run | Dataset | Tokenizer) -> bool:
    """Everyone signed in sees every run and artifact; only its owner or staff may change it."""
    return bool(user and user.is_authenticated and (user.is_staff or obj.owner_id == user.pk))


def _require_manage(user, run: Run, action: str) -> None:
    if not can_manage(user, run):
        raise PermissionDenied(f"only the run's owner or staff may {action} it")


def _check_name(name: str, model, field: str = "name") -> None:
    """A display name: never part of a path, but still one line of readable text, unique."""
    if not name or not name.strip():
        raise ConfigError({field: "is required"})
    if len(name) > NAME_LENGTH:
        raise ConfigError({field: f"use at most {NAME_LENGTH} characters"})
    if any(unicodedata.category(c).startswith("C") for c in name):
        raise ConfigError({field: "must not contain control characters"})
    if name.strip() in (".", ".."):
        raise ConfigError({field: f"{name!r} is not a name"})
    if model.objects.filter(name=name).exists():
        raise ConfigError({field: f"{model.__name__.lower()} {name!r} already exists"})


def _allocate_dir(run: Run) -> None:
    run.run_dir = str(layout.run_dir(run.pk))
    Path(run.run_dir).mkdir(parents=True, exist_ok=True)
    run.save(update_fields=["run_dir"])


def _enqueue(run: Run) -> None:
    """Send the run to the training queue once the transaction that queued it commits."""
    run_id, token = run.pk, str(run.launch_token)
    transaction.on_commit(lambda: execute_run.apply_async(args=[run_id, token]))
    transaction.on_commit(lambda: broadcast.run_changed(run_id))


def _ready(obj, field: str) -> None:
    if obj is not None and obj.status != ArtifactStatus.READY:
        name = type(obj).__name__.lower()
        raise ConfigError({field: f"{name} {obj.name!r} is {obj.status}, not ready"})


# ---- submission ---------------------------------------------------------------------------


def submit_run(
    owner,
    kind: str,
    *,
    preset: str = "",
    config: Mapping[str, Any] | None = None,
    dataset: Dataset | None = None,
    tokenizer: Tokenizer | None = None,
    parent_checkpoint: Checkpoint | None = None,
    nproc_per_node: int = 1,
    name: str = "",
    probe_prompts: Any = None,
) -> Run:
    """Validate a run of `kind` and queue it; ConfigError names each bad field."""
    program = program_for(kind)
    if program.submit_via != "/api/runs/":
        raise ConfigError({"kind": f"create {kind} runs with POST {program.submit_via}"})
    errors: dict[str, str] = {}
    inputs = {
        "dataset": dataset,
        "tokenizer": tokenizer,
        "parent_checkpoint": parent_checkpoint,
        "nproc_per_node": nproc_per_node,
    }
    for needed in program.inputs:
        if inputs[needed] is None:
            errors[needed] = f"is required for a {kind} run"
    for field in ("dataset", "tokenizer"):
        try:
            _ready(inputs[field], field)
        except ConfigError as exc:
            errors.update(exc.errors)
    if not 1 <= nproc_per_node <= MAX_NPROC:
        errors["nproc_per_node"] = f"must be between 1 and {MAX_NPROC}"
    elif nproc_per_node > 1 and not program.distributed:
        errors["nproc_per_node"] = f"{kind} runs use one process"
    if kind == Kind.TOKENIZER and name:
        try:
            _check_name(name, Tokenizer)
        except ConfigError as exc:
            errors.update(exc.errors)
    try:
        probe_prompts = probes.clean_prompts(probe_prompts, kind)
    except ConfigError as exc:
        errors.update(exc.errors)
    try:
        full = program.validate(preset, config or {})
    except ConfigError as exc:
        errors.update(exc.errors)
        full = None
    if full is not None and program.check and not errors:
        try:
            program.check(full, inputs)
        except ConfigError as exc:
            errors.update(exc.errors)
    if errors:
        raise ConfigError(errors)

    try:
        return _create_run(owner, kind, preset, config, full, dataset, tokenizer,
                           parent_checkpoint, nproc_per_node, name, probe_prompts)  # fmt: skip
    except IntegrityError:  # a concurrent request took the tokenizer name
        raise ConfigError({"name": f"tokenizer {name!r} already exists"}) from None


def quick_start(owner) -> Run:
    """The dashboard's one click: the whole pipeline on the built-in data, from nothing to a
    fine-tuned, evaluated chat model (preset settings.RUNS_QUICKSTART_PRESET)."""
    return submit_run(
        owner, Kind.PIPELINE, preset=settings.RUNS_QUICKSTART_PRESET, name="quick start demo"
    )


def _create_run(owner, kind, preset, config, full, dataset, tokenizer, parent_checkpoint,
                nproc_per_node, name, probe_prompts=()) -> Run:  # fmt: skip
    with transaction.atomic():
        run = Run.objects.create(
            kind=kind, preset=preset, overrides=dict(config or {}), config=full, owner=owner,
            dataset=dataset, tokenizer=tokenizer, parent_checkpoint=parent_checkpoint,
            nproc_per_node=nproc_per_node, name=name, probe_prompts=list(probe_prompts),
        )  # fmt: skip
        _allocate_dir(run)
        if kind == Kind.TOKENIZER:
            _attach_new_tokenizer(run, name)
        _enqueue(run)
    return run


def set_probe_prompts(run: Run, user, prompts: Any) -> Run:
    """The owner changes the run's probe prompts; checkpoints saved from now on answer them
    (answers already stored stay, each with the prompt it answered)."""
    _require_manage(user, run, "change the probe prompts of")
    run.probe_prompts = probes.clean_prompts(prompts, run.kind)
    run.save(update_fields=["probe_prompts"])
    return run


def set_tags_note(run: Run, user, tags: Any = None, note: Any = None) -> Run:
    """The owner (or staff) labels the run and writes its note; None leaves that one as it is.

    Both are checked before either is saved (runs/tags.py), so a bad tag does not leave a
    half-applied edit behind."""
    _require_manage(user, run, "change the tags and note of")
    clean = tags_module.clean_tags(tags) if tags is not None else None
    text = tags_module.clean_note(note) if note is not None else None
    with transaction.atomic():
        if text is not None:
            run.note = text
            run.save(update_fields=["note"])
        if clean is not None:
            rows = [Tag.objects.get_or_create(name=name)[0] for name in clean]
            run.tags.set(rows)
    return run


def _attach_new_tokenizer(run: Run, name: str) -> None:
    """A tokenizer run builds a Tokenizer row of its own, usable once the run succeeds."""
    suffix = f"-{run.config['vocab_size']}-{run.pk}"
    name = name or run.dataset.name[: NAME_LENGTH - len(suffix)] + suffix
    tokenizer = Tokenizer.objects.create(
        name=name, owner=run.owner, dataset=run.dataset, vocab_size=run.config["vocab_size"]
    )
    tokenizer.path = str(layout.tokenizer_dir(tokenizer.pk))
    tokenizer.save(update_fields=["path"])
    run.tokenizer = tokenizer
    run.name = run.name or f"tokenizer {name}"
    run.save(update_fields=["tokenizer", "name"])


def create_tokenizer(owner, name: str, dataset: Dataset | None, config: Mapping | None) -> Run:
    """Train a tokenizer named `name` on `dataset`; returns the run that builds it."""
    if dataset is None:
        raise ConfigError({"dataset": "is required"})
    return submit_run(owner, Kind.TOKENIZER, config=config, dataset=dataset, name=name)


def create_dataset(
    owner,
    name: str,
    source: str,
    options: Mapping[str, Any] | None = None,
    uploads: Iterable | None = None,
    path: str | None = None,
) -> Dataset:
    """Record a dataset and queue the run that builds it.

    `source` is "builtin" (the offline corpus), "download" (public shards), "upload" (files
    sent with the request: .txt, .jsonl or .parquet) or "path" (a directory of shards already
    on the server, checked with the dataset `stats` command).
    """
    errors: dict[str, str] = {}
    try:
        _check_name(name, Dataset)
    except ConfigError as exc:
        errors.update(exc.errors)
    commands = DATASET_SOURCES
    if source not in commands:
        errors["source"] = f"must be one of {', '.join(commands)}"
        raise ConfigError(errors)
    if source == "path" and not (owner and owner.is_staff):
        # Registering any server directory would let users read files they should not.
        errors["source"] = "only staff may register an existing server directory"
    options = dict(options or {})
    flags = dataset_program.COMMANDS[commands[source]]
    for key in options:
        key = str(key).replace("-", "_")
        if key in flags and flags[key].path or key == "overwrite":
            errors[f"options.{key}"] = "is set by the app"
    try:
        config = flags.validate({k: v for k, v in options.items() if k != "overwrite"})
    except ConfigError as exc:
        errors.update({f"options.{k}": v for k, v in exc.errors.items()})
        config = {}
    errors.update(url_errors(flags, options, "options."))  # e.g. base_url: public hosts only
    uploads = list(uploads or [])
    if source == "upload":
        if not uploads:
            errors["files"] = "upload at least one .txt, .jsonl or .parquet file"
        for upload in uploads:
            if not str(upload.name).lower().endswith(UPLOAD_SUFFIXES):
                errors["files"] = f"{upload.name}: expected .txt, .jsonl or .parquet"
    elif uploads:
        errors["files"] = "files are only accepted with source 'upload'"
    if source == "path":
        if not path:
            errors["path"] = "is required for source 'path'"
        elif not Path(path).is_dir():
            errors["path"] = f"{path} is not a directory on the server"
    if errors:
        raise ConfigError(errors)

    config["command"] = commands[source]
    if "overwrite" in flags:
        config["overwrite"] = True  # the directory is the app's own; a retry rebuilds it
    try:
        return _create_dataset_rows(owner, name, source, options, config, uploads, path)
    except IntegrityError:  # a concurrent request took the name between check and insert
        raise ConfigError({"name": f"dataset {name!r} already exists"}) from None


def _create_dataset_rows(owner, name, source, options, config, uploads, path) -> Dataset:
    with transaction.atomic():
        dataset = Dataset.objects.create(
            name=name, owner=owner, source=source, options=options, path=path or ""
        )
        if source != "path":
            dataset.path = str(layout.dataset_dir(dataset.pk))
            dataset.save(update_fields=["path"])
        run = Run.objects.create(
            kind=Kind.DATASET, name=f"dataset {name}", config=config, owner=owner,
            dataset=dataset,
        )  # fmt: skip
        _allocate_dir(run)
        if source == "upload":
            config["files"] = _save_uploads(run, uploads)
        run.config = config
        run.save(update_fields=["config"])
        _enqueue(run)
    return dataset


def _save_uploads(run: Run, uploads: list) -> list[str]:
    """Store uploads as `uploads/file-NNN.<suffix>`: the client's file name is not a path."""
    folder = Path(run.run_dir) / "uploads"
    folder.mkdir(parents=True, exist_ok=True)
    from nanochat_site.limits import write_uploads  # at most UPLOAD_MAX_BYTES, else ConfigError

    targets = []
    for i, upload in enumerate(uploads):
        suffix = next(s for s in UPLOAD_SUFFIXES if str(upload.name).lower().endswith(s))
        targets.append(folder / f"file-{i:03d}{suffix}")
    write_uploads(zip(uploads, targets, strict=True))
    return [str(target) for target in targets]


# ---- lifecycle ----------------------------------------------------------------------------


def cancel_run(run: Run, user) -> Run:
    """A queued run is cancelled at once; a running one is stopped by its worker."""
    _require_manage(user, run, "cancel")
    with transaction.atomic():
        run = Run.objects.select_for_update().get(pk=run.pk)
        if run.status == Status.QUEUED:
            run.status = Status.CANCELLED
            run.finished_at = timezone.now()
            run.error = "cancelled before it started"
            run.save(update_fields=["status", "finished_at", "error"])
            run.mark_artifacts()
            signals.send_run_finished(run)
        elif run.status == Status.RUNNING:
            run.cancel_requested = True
            run.save(update_fields=["cancel_requested"])
        else:
            raise Conflict(f"run {run.pk} is {run.status}; only queued or running runs cancel")
    transaction.on_commit(lambda: broadcast.run_changed(run.pk))
    return run


def resume_run(run: Run, user) -> Run:
    """Continue a failed or cancelled run from its last checkpoint, in the same directory."""
    _require_manage(user, run, "resume")
    program = program_for(run.kind)
    if not program.resumable:
        raise Conflict(f"{run.kind} runs cannot be resumed; retry it instead")
    with transaction.atomic():
        run = Run.objects.select_for_update().get(pk=run.pk)
        if run.status not in (Status.FAILED, Status.CANCELLED):
            raise Conflict(f"run {run.pk} is {run.status}; only failed or cancelled runs resume")
        # A worker that died left lines it never stored (perhaps a later checkpoint): store
        # them first, so the resume point is the true last checkpoint.
        catch_up(run)
        last = run.checkpoints.order_by("-step").first()
        if last is None:
            raise Conflict(f"run {run.pk} saved no checkpoint to resume from; retry it instead")
        # Points past the checkpoint will be produced again; keep the curves single-valued.
        run.metric_points.filter(step__gt=last.step).delete()
        run.samples.filter(step__gt=last.step).delete()
        run.resume_step = last.step
        run.step = last.step
        if run.total_steps:
            run.progress = last.step / run.total_steps
        _requeue(run)
        _enqueue(run)
    return run


def _requeue(run: Run) -> None:
    run.status = Status.QUEUED
    run.launch_token = uuid.uuid4()
    run.cancel_requested = False
    run.exit_code = None
    run.error = ""
    run.finished_at = None
    run.heartbeat_at = None
    run.pid = None
    run.save()


def retry_run(run: Run, user) -> Run:
    """Run the same thing again from scratch as a new run (the original stays as it was).

    A dataset or tokenizer run rebuilds its own artifact in place instead, since the artifact
    is the run's whole point and its name must stay unique.
    """
    if run.is_active:
        raise Conflict(f"run {run.pk} is {run.status}; wait for it to finish or cancel it")
    if run.kind in (Kind.DATASET, Kind.TOKENIZER):
        _require_manage(user, run, "retry")
        with transaction.atomic():
            run = Run.objects.select_for_update().get(pk=run.pk)
            if run.is_active:
                raise Conflict(f"run {run.pk} is already {run.status}")
            artifact = run.dataset if run.kind == Kind.DATASET else run.tokenizer
            artifact.status = ArtifactStatus.BUILDING
            artifact.save(update_fields=["status"])
            run.resume_step = None
            _requeue(run)
            _enqueue(run)
        return run
    with transaction.atomic():
        retry = submit_run(
            user, run.kind, preset=run.preset, config=run.overrides, dataset=run.dataset,
            tokenizer=run.tokenizer, parent_checkpoint=run.parent_checkpoint,
            nproc_per_node=run.nproc_per_node, name=run.name, probe_prompts=run.probe_prompts,
        )  # fmt: skip
        retry.retry_of = run
        retry.save(update_fields=["retry_of"])
    return retry


def delete_run(run: Run, user) -> None:
    """Delete a finished run, its rows and its directory (checkpoints included)."""
    _require_manage(user, run, "delete")
    if run.status in ACTIVE_STATUSES:
        raise Conflict(f"run {run.pk} is {run.status}; cancel it first")
    if Run.objects.filter(parent_checkpoint__run=run).exists():
        raise Conflict(f"run {run.pk} has checkpoints that other runs started from")
    if run.kind == Kind.DATASET and run.dataset and run.dataset.runs.exclude(pk=run.pk).exists():
        raise Conflict(f"dataset {run.dataset.name} is used by other runs; delete them first")
    directory = run_dir_of(run)
    with transaction.atomic():
        if run.kind == Kind.TOKENIZER and run.tokenizer:
            tokenizer = run.tokenizer
            if tokenizer.runs.exclude(pk=run.pk).exists():
                raise Conflict(f"tokenizer {tokenizer.name} is used by other runs")
            owned = artifact_dir(tokenizer, run)
            run.delete()
            delete_tree_on_commit(owned)
            tokenizer.delete()
        elif run.kind == Kind.DATASET and run.dataset:
            dataset = run.dataset
            owned = artifact_dir(dataset, run)
            run.delete()
            delete_tree_on_commit(owned)
            dataset.delete()
        else:
            run.delete()
        delete_tree_on_commit(directory)


def run_dir_of(run: Run) -> Path | None:
    """The run's directory if it is the one the layout gave it (a pipeline stage's: below its
    pipeline's), else None: a directory the run does not own is never deleted with it."""
    if run.pipeline_id:
        return layout.removable(run.run_dir, within=[layout.run_dir(run.pipeline_id)])
    return layout.removable(run.run_dir, exact=[layout.run_dir(run.pk)])


def artifact_dir(artifact: Dataset | Tokenizer, build: Run | None) -> Path | None:
    """The directory a dataset or tokenizer row owns, None if there is none it may delete.

    Its id-based directory, or a directory below the run that built it (or that run's
    pipeline), or -- rows made before names stopped being paths -- `<folder>/<its name>`.
    A dataset registered from an existing server directory owns nothing.
    """
    if isinstance(artifact, Dataset):
        if artifact.source == Dataset.Source.PATH:
            return None
        exact = [layout.dataset_dir(artifact.pk), layout.legacy_dir("datasets", artifact.name)]
    else:
        exact = [layout.tokenizer_dir(artifact.pk), layout.legacy_dir("tokenizers", artifact.name)]
    within = []
    if build is not None:
        within = [layout.run_dir(build.pk)]
        if build.pipeline_id:
            within.append(layout.run_dir(build.pipeline_id))
    return layout.removable(artifact.path, exact=exact, within=within)


def delete_tree_on_commit(path: Path | None) -> None:
    """Remove a directory a row owned (see run_dir_of, artifact_dir) once the rows are gone."""
    if path is not None:
        transaction.on_commit(lambda: shutil.rmtree(path, ignore_errors=True))


def program_of(run: Run) -> Program:
    return program_for(run.kind)
