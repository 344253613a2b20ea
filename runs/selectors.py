"""Reads for the dashboard pages and the API: which runs, checkpoints and scores to show.

Writes live in runs/services.py; these functions only query, so the pages, the API and the
admin agree on what "the runs of alice that failed" or "the best ChatCORE" means.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from django.db.models import QuerySet

from runs.models import ACTIVE_STATUSES, Checkpoint, EvalResult, MetricPoint, Run, Status

# Leaderboard columns and the event-file task names that feed each (chat_eval writes task ids,
# base_eval the CORE score; either spelling is accepted).
LEADERBOARD_COLUMNS: dict[str, tuple[str, ...]] = {
    "CORE": ("CORE", "core"),
    "ARC-Easy": ("ARC-Easy", "arc_easy"),
    "ARC-Challenge": ("ARC-Challenge", "arc_challenge"),
    "MMLU": ("MMLU", "mmlu"),
    "GSM8K": ("GSM8K", "gsm8k"),
    "HumanEval": ("HumanEval", "humaneval"),
    "SpellingBee": ("SpellingBee", "spelling_bee"),
    "ChatCORE": ("ChatCORE", "chatcore"),
}
# The metric that counts for a column when a task reports several (e.g. accuracy and format).
HEADLINE_METRICS = ("accuracy", "centered", "score", "value")
STAGE_ORDER = {"rl": 0, "sft": 1, "mid": 2, "base": 3}


def filter_runs(runs: QuerySet, params: Mapping[str, Any], user=None) -> QuerySet:
    """Runs matching the list filters (kind, status, owner username, mine, search by name)."""
    if params.get("kind"):
        runs = runs.filter(kind=params["kind"])
    if params.get("status"):
        runs = runs.filter(status=params["status"])
    if params.get("owner"):
        runs = runs.filter(owner__username=params["owner"])
    if params.get("mine") and user is not None:
        runs = runs.filter(owner=user)
    if params.get("search"):
        runs = runs.filter(name__icontains=params["search"])
    return runs


def run_list() -> QuerySet:
    return Run.objects.select_related("owner", "dataset", "tokenizer", "parent_checkpoint")


def active_runs() -> list[Run]:
    """Running first (oldest start first), then the queue in submission order."""
    runs = list(run_list().filter(status__in=ACTIVE_STATUSES).order_by("created", "id"))
    return sorted(runs, key=lambda r: r.status != Status.RUNNING)


def chat_checkpoints(limit: int = 8) -> list[Checkpoint]:
    """Newest checkpoints to chat with: the latest step of each directory, chat stages first."""
    latest: dict[str, Checkpoint] = {}
    for ckpt in Checkpoint.objects.select_related("run").order_by("-step", "-id")[:500]:
        latest.setdefault(ckpt.path, ckpt)
    ordered = sorted(latest.values(), key=lambda c: (STAGE_ORDER.get(c.stage, 9), -c.pk))
    return ordered[:limit]


def samples_by_step(run: Run) -> list[tuple[int, list]]:
    """[(step, [samples])], newest step first."""
    grouped: dict[int, list] = defaultdict(list)
    for sample in run.samples.order_by("-step", "id"):
        grouped[sample.step].append(sample)
    return list(grouped.items())


# ---- leaderboard ---------------------------------------------------------------------------


@dataclass
class LeaderboardRow:
    checkpoint: Checkpoint
    scores: dict[str, float | None] = field(default_factory=dict)

    @property
    def cells(self) -> list[float | None]:
        return [self.scores.get(column) for column in LEADERBOARD_COLUMNS]


def _column_of(task: str) -> str | None:
    for column, names in LEADERBOARD_COLUMNS.items():
        if task in names:
            return column
    return None


def leaderboard(sort: str = "ChatCORE") -> list[LeaderboardRow]:
    """One row per evaluated checkpoint with its latest score per column, best `sort` first."""
    rows: dict[int, LeaderboardRow] = {}
    results = (
        EvalResult.objects.filter(checkpoint__isnull=False)
        .select_related("checkpoint", "checkpoint__run")
        .order_by("created", "id")
    )
    rank = {m: i for i, m in enumerate(HEADLINE_METRICS)}
    chosen: dict[tuple[int, str], int] = {}
    for result in results:
        column = _column_of(result.task)
        if column is None or result.metric not in rank:
            continue
        key = (result.checkpoint_id, column)
        # Later results of the same metric replace earlier ones; a better-ranked metric wins.
        if key in chosen and rank[result.metric] > chosen[key]:
            continue
        chosen[key] = rank[result.metric]
        row = rows.setdefault(result.checkpoint_id, LeaderboardRow(result.checkpoint))
        row.scores[column] = result.value
    if sort not in LEADERBOARD_COLUMNS:
        sort = "ChatCORE"
    return sorted(
        rows.values(),
        key=lambda r: (r.scores.get(sort) is None, -(r.scores.get(sort) or 0.0), -r.checkpoint.pk),
    )


def eval_highlights(limit: int = 5) -> list[LeaderboardRow]:
    """The best few checkpoints by ChatCORE, else by CORE: the home page's score card."""
    rows = leaderboard("ChatCORE")
    if rows and rows[0].scores.get("ChatCORE") is None:
        rows = leaderboard("CORE")
    return rows[:limit]


# ---- compare -------------------------------------------------------------------------------


def final_metrics(runs: Iterable[Run], names: Iterable[str]) -> dict[int, dict[str, float | None]]:
    """{run id: {name: the value at the run's last recorded step}} for each name."""
    names = list(names)
    out: dict[int, dict[str, float | None]] = {}
    for run in runs:
        values: dict[str, float | None] = {}
        for name in names:
            point = (
                MetricPoint.objects.filter(run_id=run.pk, name=name)
                .order_by("-step", "-id")
                .values_list("value", flat=True)
                .first()
            )
            values[name] = point
        out[run.pk] = values
    return out


def config_diff(runs: list[Run]) -> list[tuple[str, list[Any]]]:
    """[(setting, [value per run])] for the settings whose values differ between the runs."""
    keys = sorted(set().union(*(run.config for run in runs))) if runs else []
    missing = object()
    diff = []
    for key in keys:
        values = [run.config.get(key, missing) for run in runs]
        if len({repr(v) for v in values}) > 1:
            diff.append((key, [None if v is missing else v for v in values]))
    return diff


def runs_by_ids(ids: Iterable[int]) -> list[Run]:
    """The runs in the order asked for (unknown ids are skipped)."""
    ids = list(dict.fromkeys(ids))
    found = {run.pk: run for run in run_list().filter(pk__in=ids)}
    return [found[i] for i in ids if i in found]


def recent_finished_runs(limit: int = 20) -> QuerySet:
    return run_list().exclude(status__in=ACTIVE_STATUSES).order_by("-created")[:limit]
