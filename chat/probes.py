"""Answering a run's probe prompts with one of its checkpoints, through an engine worker.

The prompts, their bounds, storage and the run page's timeline are runs/probes.py's; asking an
engine worker is this floor's (chat/protocol.py), so the Celery task that does it
(chat/tasks.py, queued by name by the run's follower) lives here.
"""

from __future__ import annotations

import asyncio

from asgiref.sync import async_to_sync

from chat.protocol import EngineError, Final, GenerationRequest, Reply
from runs.models import Checkpoint
from runs.probes import MAX_TOKENS, SEED, prompts_of, store


def answer(checkpoint_id: int) -> int:
    """Answer the run's probes with one checkpoint and store them; how many were answered."""
    checkpoint = Checkpoint.objects.select_related("run").filter(pk=checkpoint_id).first()
    if checkpoint is None or checkpoint.run is None:
        return 0
    prompts = prompts_of(checkpoint.run)
    if not prompts:
        return 0
    results = async_to_sync(_answer_all)(checkpoint, prompts)
    store(checkpoint, prompts, results)
    return sum(1 for _, error in results if not error)


def request(checkpoint: Checkpoint, prompt: str) -> GenerationRequest:
    """The engine request for one probe: raw text for a base model, a user message else."""
    raw = checkpoint.stage == Checkpoint.Stage.BASE
    return GenerationRequest(
        checkpoint_path=checkpoint.path, step=checkpoint.step,
        messages=[] if raw else [{"role": "user", "content": prompt}],
        prompt=prompt if raw else None,
        temperature=0.0, top_k=0, max_tokens=MAX_TOKENS, seed=SEED,
    )  # fmt: skip


async def _answer_all(checkpoint: Checkpoint, prompts: list[str]) -> list[tuple[str, str]]:
    """(text, error) per prompt, all asked at once (a worker batches them)."""
    return list(await asyncio.gather(*(_answer_one(request(checkpoint, p)) for p in prompts)))


async def _answer_one(generation: GenerationRequest) -> tuple[str, str]:
    try:
        async with Reply(generation) as reply:
            async for event in reply:
                if isinstance(event, Final):
                    return event.content, ""
    except EngineError as exc:
        return "", str(exc)
    return "", "the engine worker sent no answer"
