"""Lineage ladder: the chain of checkpoints a model was fine-tuned through, with its scores.

A checkpoint's parent is the checkpoint its run started from (`Run.parent_checkpoint`), so a
chat model's chain reads base → mid → SFT → RL. The page and the API both call `lineage()`,
which walks that chain upwards (bounded, and safe against a cycle that hand-edited rows could
make), attaches each step's eval scores and the change from the step before, and lists the
checkpoints fine-tuned from this one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from runs import selectors
from runs.models import Checkpoint, EvalResult

# base → mid → SFT → RL is four; room for re-runs of a stage without walking forever.
MAX_DEPTH = 8


@dataclass
class Step:
    """One checkpoint of the chain, its scores per task and the change from the step before
    (None for the first step, and for a task either step lacks)."""

    checkpoint: Checkpoint
    scores: dict[str, float | None] = field(default_factory=dict)
    deltas: dict[str, float | None] = field(default_factory=dict)
    val_bpb_delta: float | None = None


@dataclass
class Lineage:
    checkpoint: Checkpoint
    steps: list[Step]  # root (base) first, `checkpoint` last
    tasks: list[str]  # the columns any step has a score for, leaderboard order first
    children: list[Checkpoint]  # the latest checkpoint of each run started from `checkpoint`
    truncated: bool  # the chain went on past MAX_DEPTH, or looped back on itself


def chain(checkpoint: Checkpoint, max_depth: int = MAX_DEPTH) -> tuple[list[Checkpoint], bool]:
    """([root, …, checkpoint], whether the walk stopped early: at max_depth or at a checkpoint
    already seen)."""
    found, seen = [checkpoint], {checkpoint.pk}
    current = checkpoint
    while True:
        run = current.run
        parent_id = run.parent_checkpoint_id if run is not None else None
        if parent_id is None:
            return found[::-1], False
        if parent_id in seen or len(found) >= max_depth:
            return found[::-1], True
        current = Checkpoint.objects.select_related("run").get(pk=parent_id)
        found.append(current)
        seen.add(current.pk)


def children(checkpoint: Checkpoint) -> list[Checkpoint]:
    """The newest step of each run fine-tuned from `checkpoint` (eval runs save none)."""
    latest: dict[int, Checkpoint] = {}
    rows = Checkpoint.objects.filter(run__parent_checkpoint=checkpoint).select_related("run")
    for child in rows.order_by("-step", "-id"):
        latest.setdefault(child.run_id, child)
    return sorted(latest.values(), key=lambda c: c.run_id)


def _delta(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else after - before


def lineage(checkpoint: Checkpoint) -> Lineage:
    checkpoints, truncated = chain(checkpoint)
    results = EvalResult.objects.filter(checkpoint__in=[c.pk for c in checkpoints])
    scores = selectors.headline_scores(results.order_by("created", "id"), lambda r: r.checkpoint_id)
    steps: list[Step] = []
    for ckpt in checkpoints:
        step = Step(ckpt, scores.get(ckpt.pk, {}))
        if steps:
            before = steps[-1]
            tasks = {*step.scores, *before.scores}
            step.deltas = {t: _delta(step.scores.get(t), before.scores.get(t)) for t in tasks}
            step.val_bpb_delta = _delta(ckpt.val_bpb, before.checkpoint.val_bpb)
        steps.append(step)
    present = {task for step in steps for task in step.scores}
    columns = [c for c in selectors.LEADERBOARD_COLUMNS if c in present]
    tasks = columns + sorted(present - set(columns))
    return Lineage(checkpoint, steps, tasks, children(checkpoint), truncated)
