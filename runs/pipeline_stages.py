"""A pipeline run's stages as runs of their own.

`training.pipeline` runs every stage as its own program with its own event file under
`<pipeline run dir>/stages/NN-name/`, and says in its own event file when each starts and ends
(`stage` events). The pipeline's worker turns that into rows: a stage that starts becomes a
child run (kind = the stage's program, `pipeline` = the parent) with the datasets, tokenizers
and parent checkpoints it reads recorded like any other run's, and the child's event file is
followed exactly as a run's own (metrics, checkpoints, evals, report), so each stage gets its
own page, charts and results. The child's status follows its `stage` events; children still
active when the pipeline ends take the pipeline's end (cancelled, failed, worker lost).

A stage run records the config its program ran with (from the program's first `start`
event, shaped like a submitted run's config), so Compare diffs a stage against any other run
setting by setting. The pipeline row carries what its stages found: the best val bpb of any
stage and an ETA from its stages' times (runs/predictions.py's `pipeline_eta`).

This module only makes and updates the rows; following the children's files is
runs/follow.py's `StageFollowers`, which imports it.
"""

from __future__ import annotations

import logging

from django.utils import timezone

from runs import ingest, layout, selectors
from runs.models import (
    ArtifactStatus,
    Checkpoint,
    Dataset,
    Kind,
    Run,
    Status,
    Tokenizer,
)
from runs.predictions import pipeline_eta
from runs.programs import APP_SET_FLAGS, PROGRAMS
from training import dataset as dataset_program

log = logging.getLogger(__name__)
STAGE_END = {
    "succeeded": Status.SUCCEEDED,
    "failed": Status.FAILED,
    "cancelled": Status.CANCELLED,
}


def stage_events(parsed: ingest.Parsed) -> list[dict]:
    return [data for kind, _, _, data in parsed.events if kind == "stage"]


def _unique_name(model, base: str) -> str:
    name, n = base, 1
    while model.objects.filter(name=name).exists():
        n += 1
        name = f"{base}-{n}"
    return name


def _artifact_at(model, path: str | None):
    """The newest Dataset / Tokenizer row recorded for a directory (None: not known)."""
    if not path:
        return None
    return model.objects.filter(path=path).order_by("-id").first()


def _parent_checkpoint(path: str | None) -> Checkpoint | None:
    if not path:
        return None
    return Checkpoint.objects.filter(path=path).order_by("-step", "-id").first()


def start_child(pipeline: Run, stage: dict) -> Run | None:
    kind = stage.get("kind")
    if kind not in Kind.values or kind == Kind.PIPELINE or not stage.get("run_dir"):
        return None
    inputs = stage.get("inputs") if isinstance(stage.get("inputs"), dict) else {}
    outputs = stage.get("outputs") if isinstance(stage.get("outputs"), dict) else {}
    # The pipeline writes every stage under its own directory; a stage event naming another
    # place (a forged or corrupted line) must not make rows that point there.
    written = [stage["run_dir"], *(v for v in outputs.values() if v)]
    if not all(isinstance(p, str) and layout.inside(p, pipeline.run_dir) for p in written):
        log.warning("pipeline %s: ignored stage %r outside its directory", pipeline.pk,
                    str(stage.get("name"))[:100])  # fmt: skip
        return None
    label = pipeline.name or f"pipeline {pipeline.pk}"
    child = Run(
        kind=kind, name=f"{label} · {stage.get('name', kind)}"[:200], owner=pipeline.owner,
        pipeline=pipeline, run_dir=str(stage["run_dir"])[:500], status=Status.RUNNING,
        started_at=timezone.now(), heartbeat_at=timezone.now(), host=pipeline.host,
        worker=pipeline.worker, config={"pipeline_stage": stage.get("name", kind)},
        nproc_per_node=pipeline.config.get("nproc_per_node", 1),
    )  # fmt: skip
    data_dir = outputs.get("data_dir") or inputs.get("data_dir")
    tok_dir = outputs.get("tokenizer_dir") or inputs.get("tokenizer_dir")
    if kind == Kind.DATASET and outputs.get("data_dir"):
        child.dataset = Dataset.objects.create(
            name=_unique_name(Dataset, f"pipeline-{pipeline.pk}-data"), owner=pipeline.owner,
            source=pipeline.config.get("dataset_source", "builtin"),
            path=outputs["data_dir"], status=ArtifactStatus.BUILDING,
        )  # fmt: skip
    else:
        child.dataset = _artifact_at(Dataset, data_dir)
    if kind == Kind.TOKENIZER and outputs.get("tokenizer_dir"):
        child.tokenizer = Tokenizer.objects.create(
            name=_unique_name(Tokenizer, f"pipeline-{pipeline.pk}-tokenizer"),
            owner=pipeline.owner, dataset=child.dataset, path=outputs["tokenizer_dir"],
            vocab_size=pipeline.config.get("vocab_size", 32768), status=ArtifactStatus.BUILDING,
        )  # fmt: skip
    else:
        child.tokenizer = _artifact_at(Tokenizer, tok_dir)
    child.parent_checkpoint = _parent_checkpoint(inputs.get("checkpoint_dir"))
    if child.tokenizer is None and child.parent_checkpoint is not None:
        child.tokenizer = child.parent_checkpoint.tokenizer
    child.save()
    return child


def first_start(parsed: ingest.Parsed) -> dict | None:
    """The first `start` event of a batch (a tokenizer stage starts twice: train, then eval)."""
    return next((data for kind, _, _, data in parsed.events if kind == "start"), None)


def stage_config(kind: str, started: dict) -> dict | None:
    """What a stage's program ran with, shaped as a submitted run of that kind stores it: every
    flag, with paths and the flags the app sets (resume step, source step) at their defaults as
    a submitted run has them, since those name the run's own places, not its settings."""
    program = PROGRAMS.get(kind)
    config = started.get("config") if isinstance(started, dict) else None
    if program is None or not isinstance(config, dict):
        return None
    flags, extra = program.flags, {}
    if kind == Kind.DATASET:  # a dataset run's flags are those of its command
        command = config.get("command")
        if command not in dataset_program.COMMANDS:
            return None
        flags, extra = dataset_program.COMMANDS[command], {"command": command}
    ran = {
        key: value
        for key, value in config.items()
        if key in flags and not flags[key].path and key not in APP_SET_FLAGS
    }
    return {**flags.defaults(), **ran, **extra}


def record_stage_config(child: Run, parsed: ingest.Parsed) -> None:
    """Store a stage's effective config from its program's first start event (once: a later
    start of the same stage, such as the tokenizer's evaluation, is another program)."""
    started = first_start(parsed)
    if started is None or set(child.config) - {"pipeline_stage"}:
        return
    config = stage_config(child.kind, started)
    if config is not None:
        child.config = {"pipeline_stage": child.config.get("pipeline_stage", child.kind), **config}
        Run.objects.filter(pk=child.pk).update(config=child.config)


def refresh_pipeline(pipeline: Run, typical: dict[str, float]) -> bool:
    """Give a pipeline row its stages' best val bpb and its ETA; True when either changed.

    `typical` is selectors.typical_stage_seconds(pipeline), fetched once per follower.
    """
    best = selectors.best_bpb_stage(pipeline)
    fields = {
        "best_val_bpb": best.best_val_bpb if best else pipeline.best_val_bpb,
        "eta_seconds": pipeline.eta_seconds,
    }
    if pipeline.status == Status.RUNNING:
        fields["eta_seconds"] = pipeline_eta(selectors.pipeline_stage_times(pipeline, typical))
    changed = {k: v for k, v in fields.items() if getattr(pipeline, k) != v}
    if changed:
        Run.objects.filter(pk=pipeline.pk).update(**changed)
        for name, value in changed.items():
            setattr(pipeline, name, value)
    return bool(changed)
