"""Probe prompts: a few fixed questions that every checkpoint of a run answers, so the run
page shows the model learning to speak, step by step, beside its loss curve.

A run's prompts are set at submission or later by its owner (at most MAX_PROMPTS, each at
most MAX_PROMPT_CHARS). When ingest records a checkpoint, the run's worker queues
`chat.probe_checkpoint` on the `default` queue (by name: talking to engine workers is the chat
floor's, above this one; chat/probes.py); that task asks an engine worker -- never the training process -- to answer each
prompt greedily (temperature 0, a fixed seed: the same checkpoint always answers the same)
in a few tokens, and stores one ProbeAnswer per prompt. A base checkpoint continues the
prompt as raw text (it never learned the chat template, as in /v1/completions); the others
answer it as a user message. An answer that could not be had (no engine worker, a prompt
longer than the model's context) is stored with its error: the page shows why, and the run
never notices.

A stage of a pipeline asks the pipeline's prompts; the pipeline's page shows its stages'
answers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from runs import broadcast, selectors
from runs.models import Checkpoint, Kind, ProbeAnswer, Run
from training.flags import ConfigError

log = logging.getLogger(__name__)

MAX_PROMPTS = 8
MAX_PROMPT_CHARS = 500
MAX_TOKENS = 32  # enough to see whether it speaks; cheap on a busy engine worker
SEED = 0
TASK = "chat.probe_checkpoint"  # chat/tasks.py: asking an engine worker is chat's floor
QUEUE = "default"  # never the training queue: a probe must not wait behind a run
FIELD = "probe_prompts"
# The kinds whose runs save checkpoints (a pipeline through its stages).
KINDS = (Kind.BASE, Kind.MID, Kind.SFT, Kind.RL, Kind.PIPELINE)


def clean_prompts(value: Any, kind: str = Kind.BASE) -> list[str]:
    """The prompts as stored: a list of strings (or text, one prompt per line, as the form
    sends it), blanks dropped; ConfigError names the field when it is not within bounds."""
    if value is None or value == "" or value == []:
        return []
    if kind not in KINDS:
        raise ConfigError({FIELD: f"{kind} runs save no checkpoint to ask"})
    if isinstance(value, str):
        value = value.splitlines()
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise ConfigError({FIELD: "must be a list of strings"})
    prompts = [p.strip() for p in value if p.strip()]
    if len(prompts) > MAX_PROMPTS:
        raise ConfigError({FIELD: f"use at most {MAX_PROMPTS} prompts"})
    if any(len(p) > MAX_PROMPT_CHARS for p in prompts):
        raise ConfigError({FIELD: f"each prompt may have at most {MAX_PROMPT_CHARS} characters"})
    if any("\x00" in p for p in prompts):
        raise ConfigError({FIELD: "must not contain NUL characters"})
    return prompts


def prompts_of(run: Run) -> list[str]:
    """The prompts a run's checkpoints answer: its own, or for a stage its pipeline's."""
    if run.probe_prompts or not run.pipeline_id:
        return list(run.probe_prompts)
    found = Run.objects.filter(pk=run.pipeline_id).values_list(FIELD, flat=True).first()
    return list(found or [])


def request_answers(run: Run, checkpoints: Iterable[Checkpoint]) -> None:
    """Queue the probes of newly saved checkpoints (called by the run's follower). A broker
    that cannot take them is recorded as the answers' error; the run carries on."""
    prompts = prompts_of(run) if checkpoints else []
    if not prompts:
        return
    from nanochat_site.celery import app

    for checkpoint in checkpoints:
        try:
            app.send_task(TASK, args=[checkpoint.pk], queue=QUEUE)
        except Exception as exc:  # noqa: BLE001 - probes are optional; training is not
            log.warning("run %s: could not queue the probes of %s", run.pk, checkpoint)
            store(checkpoint, prompts, [("", f"could not queue the probes: {exc}")] * len(prompts))


def store(checkpoint: Checkpoint, prompts: list[str], results: list[tuple[str, str]]) -> None:
    """One row per prompt (a checkpoint asked again replaces its answers); the run page
    refetches its panels."""
    run = checkpoint.run
    for index, (prompt, (text, error)) in enumerate(zip(prompts, results, strict=True)):
        ProbeAnswer.objects.update_or_create(
            checkpoint=checkpoint, index=index,
            defaults={"run": run, "step": checkpoint.step, "prompt": prompt, "text": text,
                      "error": error[:2000]},
        )  # fmt: skip
    event = [{"type": "probe", "step": checkpoint.step}]
    for target in filter(None, [run, run.pipeline]):
        broadcast.send(target, events=event)


def timeline(run: Run) -> dict[str, Any] | None:
    """The run page's table: a column per prompt, a row per checkpoint step (newest first),
    each cell the ProbeAnswer or None; None when the run has no probes and no answers."""
    answers = list(
        ProbeAnswer.objects.filter(run_id__in=selectors.pipeline_run_ids(run)).order_by(
            "-step", "-checkpoint_id", "index"
        )
    )
    prompts = list(run.probe_prompts)
    if not prompts and not answers:
        return None
    for answer_row in answers:  # prompts since removed still head their answers' column
        if answer_row.index >= len(prompts):
            prompts += [""] * (answer_row.index + 1 - len(prompts))
        prompts[answer_row.index] = prompts[answer_row.index] or answer_row.prompt
    rows: dict[int, dict[str, Any]] = {}
    for answer_row in answers:
        row = rows.setdefault(
            answer_row.checkpoint_id,
            {"step": answer_row.step, "run_id": answer_row.run_id, "cells": [None] * len(prompts)},
        )
        row["cells"][answer_row.index] = answer_row
    return {"prompts": prompts, "rows": list(rows.values())}
