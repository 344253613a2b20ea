"""Reads for the dashboard pages and the API: which runs, checkpoints and scores to show.

Writes live in runs/services.py; these functions only query, so the pages, the API and the
admin agree on what "the runs of alice that failed" or "the best ChatCORE" means.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from django.db.models import Q, QuerySet
from django.db.models.fields.json import KT

from engine.models import registry
from runs.models import (
    ACTIVE_STATUSES,
    Checkpoint,
    EvalResult,
    Kind,
    MetricPoint,
    Run,
    RunEvent,
    Status,
)
from runs.predictions import StageTime
from runs.programs import PROGRAMS
from runs.scaling import Point
from runs.tags import filter_tag

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
# The arena's rating column (arena/ratings.py): not an eval task, so not fed by eval results;
# the leaderboard page passes the ratings in.
ARENA_COLUMN = "Arena"
# The metric that counts for a column when a task reports several (e.g. accuracy and format).
HEADLINE_METRICS = ("accuracy", "centered", "score", "value")
STAGE_ORDER = {"rl": 0, "sft": 1, "mid": 2, "base": 3}


def filter_runs(runs: QuerySet, params: Mapping[str, Any], user=None) -> QuerySet:
    """Runs matching the list filters (kind, status, owner username, mine, search by name,
    tag: one of the run's tags, written as it is stored or with other case and spaces)."""
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
    if params.get("tag"):
        runs = runs.filter(tags__name=filter_tag(params["tag"]))
    return runs


def run_list() -> QuerySet:
    return Run.objects.select_related(
        "owner", "dataset", "tokenizer", "parent_checkpoint"
    ).prefetch_related("tags")


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
    offline: set[str] = field(default_factory=set)  # columns scored on offline sample data
    arena: Any = None  # the arena Rating (rating, low, high, margin, votes), None when unrated

    @property
    def cells(self) -> list[float | None]:
        return [self.scores.get(column) for column in LEADERBOARD_COLUMNS]

    @property
    def marked_cells(self) -> list[tuple[float | None, bool]]:
        """(score, measured on offline sample data) per column: the leaderboard marks those."""
        return [(self.scores.get(c), c in self.offline) for c in LEADERBOARD_COLUMNS]

    @property
    def family(self) -> str:
        return checkpoint_family(self.checkpoint)

    @property
    def family_label(self) -> str:
        return family_label(self.family)


def _column_of(task: str) -> str | None:
    for column, names in LEADERBOARD_COLUMNS.items():
        if task in names:
            return column
    return None


def leaderboard(
    sort: str = "ChatCORE",
    model: str = "",
    ratings: Mapping[int, Any] | None = None,
    tag: str = "",
) -> list[LeaderboardRow]:
    """One row per evaluated checkpoint with its latest score per column, best `sort` first;
    with `model`, only the checkpoints of that model family; with `tag`, only those whose run
    carries that tag (so a sweep's or a baseline's checkpoints can be ranked among themselves).

    `ratings` ({checkpoint id: arena Rating}) fills the Arena column, and a rated checkpoint
    without evals gets a row of its own (it has been compared, if not evaluated); sort
    "Arena" orders by rating."""
    rows: dict[int, LeaderboardRow] = {}
    results = EvalResult.objects.filter(checkpoint__isnull=False)
    if model:
        results = results.filter(family_q(model, "checkpoint__model_config"))
    if tag:
        results = results.filter(checkpoint__run__tags__name=filter_tag(tag))
    results = results.select_related("checkpoint", "checkpoint__run").order_by("created", "id")
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
        if result.data_source == EvalResult.DataSource.OFFLINE:
            row.offline.add(column)
        else:
            row.offline.discard(column)
    if ratings:
        _add_ratings(rows, ratings, model, tag)
    if sort == ARENA_COLUMN:
        return sorted(
            rows.values(),
            key=lambda r: (
                r.arena is None,
                -(r.arena.rating if r.arena else 0.0),
                -r.checkpoint.pk,
            ),
        )
    if sort not in LEADERBOARD_COLUMNS:
        sort = "ChatCORE"
    return sorted(
        rows.values(),
        key=lambda r: (r.scores.get(sort) is None, -(r.scores.get(sort) or 0.0), -r.checkpoint.pk),
    )


def _add_ratings(
    rows: dict[int, LeaderboardRow], ratings: Mapping[int, Any], model: str, tag: str = ""
) -> None:
    missing = Checkpoint.objects.filter(pk__in=[pk for pk in ratings if pk not in rows])
    if model:
        missing = missing.filter(family_q(model))
    if tag:
        missing = missing.filter(run__tags__name=filter_tag(tag))
    for checkpoint in missing.select_related("run"):
        rows[checkpoint.pk] = LeaderboardRow(checkpoint)
    for pk, row in rows.items():
        row.arena = ratings.get(pk)


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


def runs_tagged(tag: str, limit: int = 20) -> list[int]:
    """The ids of the newest `limit` runs carrying `tag`, oldest first: what the compare
    page's `?tag=` adds to its runs."""
    ids = Run.objects.filter(tags__name=filter_tag(tag)).order_by("-created", "-id")
    return list(reversed(ids.values_list("pk", flat=True)[:limit]))


def recent_finished_runs(limit: int = 20) -> QuerySet:
    return run_list().exclude(status__in=ACTIVE_STATUSES).order_by("-created")[:limit]


# ---- model families ------------------------------------------------------------------------

# Kinds that make no model: no family to show.
NO_MODEL_KINDS = (Kind.DATASET, Kind.TOKENIZER)


def families() -> list[tuple[str, str]]:
    """[(name, label)] of every model family, in the registry's order (gpt first)."""
    return [(name, registry.family(name).label) for name in registry.NAMES]


def family_label(name: str | None) -> str:
    """'Hybrid (Qwen3-Next)' for 'hybrid'; an unknown name as it is; '' for None."""
    if not name:
        return ""
    try:
        return registry.family(name).label
    except ValueError:
        return name


def checkpoint_family(checkpoint: Checkpoint) -> str:
    """The family of a checkpoint's model: its model_config's `model` (rows written before
    families existed have none: GPT)."""
    config = checkpoint.model_config if isinstance(checkpoint.model_config, dict) else {}
    name = config.get("model")
    return name if isinstance(name, str) and name else registry.DEFAULT


def family_q(name: str, field: str = "model_config") -> Q:
    """A filter on a checkpoint model_config JSON field (`field`, e.g.
    "checkpoint__model_config" from an eval result) for the checkpoints of family `name`."""
    q = Q(**{f"{field}__model": name})
    if name == registry.DEFAULT:
        q |= ~Q(**{f"{field}__has_key": "model"})
    return q


def _started_families(run_ids: Iterable[int]) -> dict[int, str]:
    """{run id: the family its latest start event says it built} (base_train's derived
    `model`, a fine-tune's derived model_config `model`), for the runs whose start says."""
    rows = (
        RunEvent.objects.filter(run_id__in=list(run_ids), type="start")
        .annotate(m=KT("data__derived__model"), cm=KT("data__derived__model_config__model"))
        .order_by("run_id", "seq")
        .values_list("run_id", "m", "cm")
    )
    found: dict[int, str] = {}
    for run_id, model, config_model in rows:  # later starts (a resume) win
        name = model or config_model
        if isinstance(name, str) and name:
            found[run_id] = name
    return found


_UNKNOWN = object()


def run_family(run: Run, started: Any = _UNKNOWN) -> str | None:
    """The model family a run trains or evaluates; None for runs that make no model.

    In order: what its start event says it built, what its config asks for (a base run's
    `model`; a pipeline's, else its base preset's), the parent checkpoint's; GPT when none
    says (runs from before families). `started` is `_started_families(...)`'s answer for the
    run when the caller fetched it for many runs at once (None: no start event says)."""
    if run.kind in NO_MODEL_KINDS:
        return None
    if started is _UNKNOWN:
        started = _started_families([run.pk]).get(run.pk)
    if started:
        return started
    config = run.config if isinstance(run.config, dict) else {}
    name = config.get("model")
    if not name and run.kind == Kind.PIPELINE:
        name = _preset_family(config.get("base_preset"))
    if isinstance(name, str) and name:
        return name
    if run.parent_checkpoint_id is not None:
        return checkpoint_family(run.parent_checkpoint)
    return registry.DEFAULT


def _preset_family(preset: Any) -> str | None:
    """The `model` a base_train preset sets (a pipeline with model '' uses its base preset's)."""
    base = PROGRAMS.get("base")
    if base is None or not isinstance(preset, str) or preset not in base.flags.presets():
        return None
    return base.flags.load_config_file(preset).get("model")


def attach_families(runs: Iterable[Run]) -> list[Run]:
    """The runs, each with `model_family` (a family name, None for runs that make no model)
    and `model_label` (what a user reads, '' when none) set: one query for them all."""
    runs = list(runs)
    started = _started_families(run.pk for run in runs)
    for run in runs:
        run.model_family = run_family(run, started.get(run.pk))
        run.model_label = family_label(run.model_family)
    return runs


# ---- training amounts (compare's x axes) ---------------------------------------------------


@dataclass
class TrainingScale:
    """How far a step takes a run, from its start event's derived data: tokens per optimizer
    step (total_batch_size) and training FLOPs per token; None where the run did not say."""

    run_id: int
    tokens_per_step: int | None = None
    flops_per_token: float | None = None
    # The model's parameter count the scaling laws use (derived `scaling_params`, else the
    # total of derived `parameters`).
    parameters: int | None = None

    @property
    def flops_per_step(self) -> float | None:
        if self.tokens_per_step is None or self.flops_per_token is None:
            return None
        return float(self.tokens_per_step) * self.flops_per_token

    def tokens_at(self, step: int) -> int | None:
        """Training tokens after `step` steps: step x total_batch_size."""
        return None if self.tokens_per_step is None else step * self.tokens_per_step

    def flops_at(self, step: int) -> float | None:
        """Training FLOPs after `step` steps: tokens x FLOPs per token."""
        tokens = self.tokens_at(step)
        if tokens is None or self.flops_per_token is None:
            return None
        return tokens * self.flops_per_token


def _positive(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value if math.isfinite(value) and value > 0 else None


def training_scales(runs: Iterable[Run]) -> dict[int, TrainingScale]:
    """{run id: TrainingScale} from each run's latest start event (one query for them all)."""
    runs = list(runs)
    scales = {run.pk: TrainingScale(run.pk) for run in runs}
    rows = (
        RunEvent.objects.filter(run_id__in=list(scales), type="start")
        .annotate(batch=KT("data__derived__total_batch_size"))
        .annotate(flops=KT("data__derived__flops_per_token"))
        .annotate(scaling=KT("data__derived__scaling_params"))
        .annotate(total=KT("data__derived__parameters__total"))
        .order_by("run_id", "seq")
        .values_list("run_id", "batch", "flops", "scaling", "total")
    )
    for run_id, batch, flops, scaling, total in rows:
        tokens, per_token = _positive(_number(batch)), _positive(_number(flops))
        params = _positive(_number(scaling)) or _positive(_number(total))
        if tokens is not None:
            scales[run_id].tokens_per_step = int(tokens)
        if per_token is not None:
            scales[run_id].flops_per_token = per_token
        if params is not None:
            scales[run_id].parameters = int(params)
    return scales


def _number(text: Any) -> float | None:
    """A KT() value (text in the database) as a number, None when it is not one."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        return text
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


# ---- scores per checkpoint or run (lineage, scaling view) ----------------------------------


def headline_scores(results: Iterable[EvalResult], key: Any) -> dict[Any, dict[str, float | None]]:
    """{key(result): {column: score}}: per leaderboard column (a task of no column under its
    own name) the latest score of the best-ranked headline metric, as the leaderboard picks.
    Pass the results oldest first; `key` groups them (by checkpoint, by run)."""
    rank = {m: i for i, m in enumerate(HEADLINE_METRICS)}
    chosen: dict[tuple[Any, str], int] = {}
    out: dict[Any, dict[str, float | None]] = defaultdict(dict)
    for result in results:
        if result.metric not in rank:
            continue
        group, column = key(result), _column_of(result.task) or result.task
        if (group, column) in chosen and rank[result.metric] > chosen[(group, column)]:
            continue
        chosen[(group, column)] = rank[result.metric]
        out[group][column] = result.value
    return dict(out)


def scaling_points(runs: list[Run]) -> list[Point]:
    """A runs.scaling.Point per run (which needs `model_family`, see attach_families): its
    training FLOPs (step x total_batch_size x flops_per_token), parameters, final val bpb (else
    its best) and CORE (scored on the run or on one of its checkpoints), with why any is
    missing."""
    scales = training_scales(runs)
    finals = final_metrics(runs, ["val/bpb"])
    ids = [run.pk for run in runs]
    results = (
        EvalResult.objects.filter(Q(run_id__in=ids) | Q(checkpoint__run_id__in=ids))
        .filter(task__in=LEADERBOARD_COLUMNS["CORE"])
        .select_related("checkpoint")
        .order_by("created", "id")
    )
    cores = headline_scores(results, lambda r: r.checkpoint.run_id if r.checkpoint else r.run_id)
    points = []
    for run in runs:
        scale = scales[run.pk]
        point = Point(run.pk, f"#{run.pk} {run}", run.model_family or registry.DEFAULT)
        point.flops = scale.flops_at(run.step) if run.step > 0 else None
        point.params = scale.parameters
        point.bpb = finals[run.pk]["val/bpb"]
        if point.bpb is None:
            point.bpb = run.best_val_bpb
        point.core = cores.get(run.pk, {}).get("CORE")
        if scale.flops_per_token is None:
            point.missing.append("no flops_per_token in its start event")
        elif scale.tokens_per_step is None:
            point.missing.append("no total_batch_size in its start event")
        elif run.step <= 0:
            point.missing.append("no step trained")
        if point.params is None:
            point.missing.append("no parameter count in its start event")
        if point.bpb is None:
            point.missing.append("no val bpb")
        if point.core is None:
            point.missing.append("no CORE score")
        points.append(point)
    return points


# ---- names a user reads --------------------------------------------------------------------


def kind_label(kind: str) -> str:
    """'base model evaluation' for 'base_eval': the one wording of a run kind on every page,
    title and button (Kind's labels); an unknown kind as it is."""
    try:
        return Kind(kind).label
    except ValueError:
        return str(kind)


# ---- tokenizers ----------------------------------------------------------------------------

# Where the tokenizer evaluation's bytes-per-token numbers sit in Tokenizer.stats: tok_eval
# writes `tok/bytes_per_token/<kind of text>`; rows from before that prefix lack "tok/".
COMPRESSION_PREFIXES = ("tok/bytes_per_token/", "bytes_per_token/")


def compression(stats: Any) -> dict[str, float]:
    """{kind of text: bytes per token} from a tokenizer's evaluation stats."""
    found: dict[str, float] = {}
    for key, value in (stats if isinstance(stats, dict) else {}).items():
        for prefix in COMPRESSION_PREFIXES:
            if isinstance(key, str) and key.startswith(prefix) and key != prefix:
                found.setdefault(key[len(prefix) :], value)
    return found


def compression_table(tokenizers: Iterable) -> tuple[list[str], list]:
    """(kinds of text, the tokenizers each with `compression`: its value per kind, None where
    it was not measured): the columns and rows of the tokenizers page."""
    rows = list(tokenizers)
    measured = {t.pk: compression(t.stats) for t in rows}
    kinds = sorted({kind for values in measured.values() for kind in values})
    for tokenizer in rows:
        tokenizer.compression = [measured[tokenizer.pk].get(kind) for kind in kinds]
    return kinds, rows


# ---- pipelines: a pipeline shows what its stages made --------------------------------------


def pipeline_run_ids(run: Run) -> list[int]:
    """The run and, for a pipeline, its stage runs: whose checkpoints and evals its page shows."""
    return [run.pk, *run.stage_runs.values_list("pk", flat=True)]


def run_checkpoints(run: Run) -> QuerySet:
    """A run's checkpoints, newest step first; a pipeline's are its stages' (each with its
    `run`, the stage it came from)."""
    return Checkpoint.objects.filter(run_id__in=pipeline_run_ids(run)).select_related("run")


def newest_checkpoint(run_id: int) -> Checkpoint | None:
    """What a chat following run `run_id` talks to: the checkpoint it saved last (a
    pipeline's: its latest stage's), read when each message is sent, so a running run's
    replies improve as it trains. None for an unknown run or one with no checkpoint yet."""
    run = Run.objects.filter(pk=run_id).first()
    if run is None:
        return None
    return run_checkpoints(run).order_by("-created", "-id").first()


def followable_runs() -> list[tuple[Run, Checkpoint]]:
    """[(run, its newest checkpoint)] for every run that saved one (running ones included;
    a pipeline through its stages too), most recently saved first: the chat picker's
    "follow run" entries and the `run-<id>` models of /v1/models."""
    newest: dict[int, Checkpoint] = {}
    checkpoints = Checkpoint.objects.filter(run__isnull=False).select_related("run")
    for checkpoint in checkpoints.order_by("-created", "-id"):
        for run_id in (checkpoint.run_id, checkpoint.run.pipeline_id):
            if run_id is not None:
                newest.setdefault(run_id, checkpoint)
    runs = Run.objects.in_bulk(list(newest))
    return [(runs[pk], checkpoint) for pk, checkpoint in newest.items() if pk in runs]


def run_eval_results(run: Run) -> QuerySet:
    """A run's eval results; a pipeline's are its stages' (each with its `run`, the stage)."""
    return EvalResult.objects.filter(run_id__in=pipeline_run_ids(run)).select_related(
        "run", "checkpoint"
    )


def best_bpb_stage(run: Run) -> Run | None:
    """The stage run of a pipeline with the lowest best val bpb (None: no stage measured one)."""
    return run.stage_runs.filter(best_val_bpb__isnull=False).order_by("best_val_bpb", "id").first()


def stage_name(run: Run) -> str:
    """The name a pipeline gave the stage this run is ('chat_eval_sft'); '' for other runs."""
    config = run.config if isinstance(run.config, dict) else {}
    return str(config.get("pipeline_stage") or "") if run.pipeline_id else ""


def latest_start_data(run: Run) -> object:
    """The data of the run's latest start event (None without one; unchecked JSON)."""
    return (
        RunEvent.objects.filter(run_id=run.pk, type="start")
        .order_by("-seq")
        .values_list("data", flat=True)
        .first()
    )


def planned_stages(run: Run) -> list[dict]:
    """[{name, kind}] of a pipeline's stages in order, from its latest start event."""
    data = latest_start_data(run)
    stages = data.get("stages") if isinstance(data, dict) else None
    return [s for s in stages or [] if isinstance(s, dict) and isinstance(s.get("name"), str)]


MAX_OPTIMIZER_GROUPS = 64


def _shown_number(value: object) -> str:
    """A number from an event file for display ('-' for anything else, never raw text)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return "-"
    return f"{value:.4g}"


def optimizer_groups(run: Run) -> list[dict[str, str]]:
    """The optimizer's param groups as the run's latest start event recorded them (a training
    program's derived.optimizer.groups: LRs after batch and width scaling, decay, betas or
    momentum), as display strings: what the run actually used, not just its flags."""
    data = latest_start_data(run)
    derived = data.get("derived") if isinstance(data, dict) else None
    optimizer = derived.get("optimizer") if isinstance(derived, dict) else None
    groups = optimizer.get("groups") if isinstance(optimizer, dict) else None
    rows = []
    for group in (groups if isinstance(groups, list) else [])[:MAX_OPTIMIZER_GROUPS]:
        if not isinstance(group, dict):
            continue
        betas = group.get("betas")
        if isinstance(betas, list) and len(betas) == 2:
            extra = "betas " + ", ".join(_shown_number(b) for b in betas)
        else:
            extra = f"momentum {_shown_number(group.get('momentum'))}"
        rows.append({
            "name": str(group.get("name", ""))[:64],
            "kind": str(group.get("kind", ""))[:16],
            "lr": _shown_number(group.get("lr")),
            "weight_decay": _shown_number(group.get("weight_decay")),
            "extra": extra,
        })  # fmt: skip
    return rows


def typical_stage_seconds(run: Run, limit: int = 200) -> dict[str, float]:
    """{stage name: median seconds it took} in earlier succeeded pipelines: those of the same
    preset when they ran that stage, else any pipeline's (the stage estimates of an ETA)."""
    rows = (
        Run.objects.filter(
            pipeline__status=Status.SUCCEEDED, status=Status.SUCCEEDED,
            started_at__isnull=False, finished_at__isnull=False,
        )
        .exclude(pipeline_id=run.pk)
        .annotate(stage=KT("config__pipeline_stage"))
        .order_by("-id")
        .values_list("stage", "pipeline__preset", "started_at", "finished_at")[:limit]
    )  # fmt: skip
    same: dict[str, list[float]] = defaultdict(list)
    other: dict[str, list[float]] = defaultdict(list)
    for stage, preset, started, finished in rows:
        if stage:
            seconds = (finished - started).total_seconds()
            (same if preset == run.preset else other)[stage].append(seconds)
    return {name: _median(same.get(name) or other[name]) for name in {*same, *other}}


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def pipeline_stage_times(run: Run, typical: Mapping[str, float] | None = None) -> list:
    """A pipeline's planned stages as predictions.StageTime: done, running or waiting, with
    what each took or has taken and how long such a stage usually takes."""
    typical = typical_stage_seconds(run) if typical is None else typical
    children: dict[str, Run] = {}
    for child in run.stage_runs.order_by("id"):
        children[stage_name(child)] = child  # a stage run twice (resume): the latest counts
    plan = planned_stages(run)
    reached = max((i for i, s in enumerate(plan) if s["name"] in children), default=-1)
    times = []
    for index, stage in enumerate(plan):
        name, child = stage["name"], children.get(stage["name"])
        usual = typical.get(name)
        if child is None:  # skipped (its outputs existed) when a later stage has begun
            state = "done" if index < reached else "waiting"
            times.append(StageTime(name, state, typical=usual))
            continue
        elapsed = child.duration_seconds or 0.0
        if child.status == Status.RUNNING:
            eta = child.eta_seconds
            times.append(StageTime(name, "running", elapsed, child.progress, eta, usual))
        elif child.status == Status.QUEUED:
            times.append(StageTime(name, "waiting", typical=usual))
        else:
            times.append(StageTime(name, "done", elapsed, 1.0, 0.0, usual))
    return times
