"""A pipeline run's stages as runs of their own.

`training.pipeline` runs every stage as its own program with its own event file under
`<pipeline run dir>/stages/NN-name/`, and says in its own event file when each starts and ends
(`stage` events). The pipeline's worker turns that into rows: a stage that starts becomes a
child run (kind = the stage's program, `pipeline` = the parent) with the datasets, tokenizers
and parent checkpoints it reads recorded like any other run's, and the child's event file is
followed exactly as a run's own (metrics, checkpoints, evals, report), so each stage gets its
own page, charts and results. The child's status follows its `stage` events; children still
active when the pipeline ends take the pipeline's end (cancelled, failed, worker lost).

This module only makes the rows; following the children's files is runs/follow.py's
`StageFollowers`, which imports it.
"""

from __future__ import annotations

import logging

from django.utils import timezone

from runs import ingest, layout
from runs.models import (
    ArtifactStatus,
    Checkpoint,
    Dataset,
    Kind,
    Run,
    Status,
    Tokenizer,
)

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
