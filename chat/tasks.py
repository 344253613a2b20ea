"""Celery tasks of the chat floor (queue `default`): answer a new checkpoint's probe prompts."""

from __future__ import annotations

from celery import shared_task

from chat import probes
from runs.probes import TASK


@shared_task(name=TASK, ignore_result=True)
def probe_checkpoint(checkpoint_id: int) -> int:
    return probes.answer(checkpoint_id)
