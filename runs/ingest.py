"""Turning a run's event-file lines into rows: metrics, checkpoints, samples, evals, reports.

`parse_events` is pure (events in, plain rows out) so it is tested without a database;
`apply` writes one batch in one transaction. Metric points and events, the two tables that
grow by the hundred thousand, are inserted with one `executemany` of plain tuples rather than
`bulk_create`: building a model instance per row was most of the time, and SQLite's 999-
parameter limit cut bulk_create into ~200-row statements. That keeps a 100k-point backlog well
under the 5 s target (numbers in docs/benchmarks.md, from runs/bench_ingest.py).

The file is written by our own programs but read defensively: a line that does not fit the
contract (a step that is not a number, NaN in a JSON column) is dropped or cleaned here, since
a batch the database refuses would be re-read and refused forever; a checkpoint outside the
run's own directory is not recorded, so no line can point a row at another user's files.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.db import connection, transaction

from runs import layout
from runs.models import (
    Checkpoint,
    Dataset,
    EvalResult,
    Kind,
    MetricPoint,
    Report,
    Run,
    RunEvent,
    Sample,
    Tokenizer,
)

# Metrics a run's summary columns follow.
# Headline scores of an `eval` event that are also eval results (the leaderboard's columns).
SCORE_RESULTS = {"core": "CORE", "chatcore": "ChatCORE"}
PROGRESS = "train/progress"
ETA = "train/eta_sec"
VAL_BPB = "val/bpb"
# Runs that score another run's checkpoint (their input) rather than one of their own.
EVAL_KINDS = (Kind.BASE_EVAL, Kind.CHAT_EVAL)
_INT32 = 2**31  # IntegerField columns: a larger step would make the whole batch fail
_INT64 = 2**63
PATH_LENGTH = Checkpoint._meta.get_field("path").max_length
log = logging.getLogger(__name__)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _step(value: Any) -> int | None:
    """A step is a whole number that fits the column; anything else makes it absent."""
    number = _number(value)
    if number is None or number != int(number) or not -_INT32 <= number < _INT32:
        return None
    return int(number)


def _count(value: Any, limit: int = _INT64) -> bool:
    """A size or count the columns can hold (non-negative, in range)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < limit


def _path(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= PATH_LENGTH


def _finite(value: Any) -> Any:
    """JSON-safe copy: NaN/inf (which json.loads accepts) become null, as EventWriter does."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


@dataclass
class Parsed:
    """Everything one batch of events adds, as plain data."""

    events: list[tuple[str, float, int | None, dict]] = field(default_factory=list)
    metrics: list[tuple[str, int, float | None, float]] = field(default_factory=list)
    checkpoints: list[dict] = field(default_factory=list)
    samples: list[tuple[int, str, str]] = field(default_factory=list)
    # Each with "checkpoint_index": the checkpoint of this batch it follows (-1: none).
    eval_results: list[dict] = field(default_factory=list)
    reports: list[tuple[str, str]] = field(default_factory=list)
    start: dict | None = None
    end: dict | None = None
    dataset: dict | None = None
    tokenizer: dict | None = None
    eval_values: dict[str, float] = field(default_factory=dict)
    last_step: int | None = None
    progress: float | None = None
    eta: float | None = None
    min_val_bpb: float | None = None


def parse_events(events: list[dict]) -> Parsed:
    out = Parsed()
    for event in events:
        kind = event.get("type")
        when = _number(event.get("time")) or 0.0
        step = _step(event.get("step"))
        data = _finite({k: v for k, v in event.items() if k not in ("type", "time")})
        out.events.append((str(kind)[:32], when, step, data))
        if kind in ("metrics", "eval"):
            _parse_values(out, kind, step, when, data.get("values"))
        if kind == "eval" and isinstance(data.get("values"), dict):
            for name, task in SCORE_RESULTS.items():
                value = _number(data["values"].get(name))
                if value is not None:
                    out.eval_results.append({
                        "task": task, "metric": "score", "value": value, "details": {},
                        "data_source": _data_source(data),
                        "checkpoint_index": len(out.checkpoints) - 1,
                    })  # fmt: skip
        elif kind == "start":
            out.start = data
        elif kind == "end":
            out.end = data
        elif kind == "checkpoint" and step is not None and _path(data.get("path")):
            meta = data.get("meta") if isinstance(data.get("meta"), dict) else {}
            out.checkpoints.append({"step": step, "path": data["path"], "meta": meta})
        elif kind == "sample" and step is not None:
            out.samples.append((step, str(data.get("prompt", "")), str(data.get("completion", ""))))
        elif kind == "eval_result" and isinstance(data.get("task"), str):
            details = data.get("details") if isinstance(data.get("details"), dict) else {}
            out.eval_results.append({
                "task": data["task"][:64], "metric": str(data.get("metric", "accuracy"))[:64],
                "value": _number(data.get("value")), "details": details,
                "data_source": _data_source(data),
                "checkpoint_index": len(out.checkpoints) - 1,
            })  # fmt: skip
        elif kind == "report" and isinstance(data.get("markdown"), str):
            out.reports.append((str(data.get("section", "Report"))[:200], data["markdown"]))
        elif kind == "dataset":
            out.dataset = data
        elif kind == "tokenizer":
            out.tokenizer = data
    return out


def _data_source(data: dict) -> str:
    """The event's data_source when it is one we know, else blank (older files: unknown)."""
    value = data.get("data_source")
    return value if value in EvalResult.DataSource.values else ""


def _parse_values(out: Parsed, kind: str, step: int | None, when: float, values: Any) -> None:
    if not isinstance(values, dict) or step is None:
        return
    for name, value in values.items():
        number = _number(value)
        out.metrics.append((str(name)[:64], step, number, when))
        if kind == "eval" and number is not None:
            out.eval_values[str(name)] = number
            if name == VAL_BPB:
                best = out.min_val_bpb
                out.min_val_bpb = number if best is None else min(best, number)
    if kind == "metrics":
        out.last_step = step if out.last_step is None else max(out.last_step, step)
        progress, eta = _number(values.get(PROGRESS)), _number(values.get(ETA))
        out.progress = out.progress if progress is None else progress
        out.eta = out.eta if eta is None else eta


def checkpoint_size(path: str, step: int) -> int | None:
    """Bytes of one saved step: model, meta and every rank's optimizer shard."""
    directory = Path(path)
    try:
        files = [p for p in directory.iterdir() if f"_{step:06d}" in p.name and p.is_file()]
    except OSError:
        return None
    return sum(p.stat().st_size for p in files)


def apply(run: Run, parsed: Parsed, offset: int) -> list[Checkpoint]:
    """Store one parsed batch and move the run's read position to `offset`, atomically.

    Either all of it lands with the new offset or none of it does, so a crash between two
    batches re-reads exactly the lines that were not stored.
    """
    created: list[Checkpoint] = []
    with transaction.atomic():
        seq0 = run.events_count
        data_field = RunEvent._meta.get_field("data")
        _insert(
            RunEvent, ("run", "seq", "type", "time", "step", "data"),
            [(run.pk, seq0 + i, t, tm, s, data_field.get_db_prep_save(d, connection))
             for i, (t, tm, s, d) in enumerate(parsed.events)],
        )  # fmt: skip
        _insert(
            MetricPoint, ("run", "name", "step", "value", "time"),
            [(run.pk, *point) for point in parsed.metrics],
        )  # fmt: skip
        Sample.objects.bulk_create(
            [Sample(run=run, step=s, prompt=p, completion=c) for s, p, c in parsed.samples]
        )
        Report.objects.bulk_create(
            [Report(run=run, section=s, markdown=m) for s, m in parsed.reports]
        )
        root = _checkpoint_root(run) if parsed.checkpoints else None
        for info in parsed.checkpoints:
            owned = root is not None and layout.inside(info["path"], root)
            if not owned:
                log.warning("run %s: checkpoint event for %r ignored: not inside %s",
                            run.pk, info["path"][:200], root)  # fmt: skip
            created.append(_record_checkpoint(run, info) if owned else None)
        _record_eval_results(run, parsed.eval_results, created)
        _update_artifacts(run, parsed)
        fields = _run_updates(run, parsed)
        run.events_offset = offset
        run.events_count = seq0 + len(parsed.events)
        Run.objects.filter(pk=run.pk).update(
            events_offset=offset, events_count=run.events_count, **fields
        )
        for name, value in fields.items():
            setattr(run, name, value)
    return [c for c in created if c is not None]


def _insert(model, fields: Sequence[str], rows: list[tuple]) -> None:
    """INSERT plain tuples (already in database form) in one go.

    PostgreSQL gets COPY: Django's psycopg cursors bind parameters client-side, so an
    executemany there is one statement per row (6 s for 100k points); COPY streams them.
    SQLite's executemany runs one prepared statement for all rows in C.
    """
    if not rows:
        return
    meta, quote = model._meta, connection.ops.quote_name
    table = quote(meta.db_table)
    columns = ", ".join(quote(meta.get_field(name).column) for name in fields)
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql" and hasattr(cursor.cursor, "copy"):  # psycopg 3
            # The raw cursor bypasses Django's error translation; wrap it to keep IntegrityError.
            copy_sql = f"COPY {table} ({columns}) FROM STDIN"
            with connection.wrap_database_errors, cursor.cursor.copy(copy_sql) as copy:
                for row in rows:
                    copy.write_row(row)
        else:
            values = ", ".join(["%s"] * len(fields))
            cursor.executemany(f"INSERT INTO {table} ({columns}) VALUES ({values})", rows)


def _checkpoint_root(run: Run) -> str | None:
    """Where the run's checkpoints may be: its own directory (a pipeline stage's: the
    pipeline's, whose `out/` holds every stage's checkpoints). A `checkpoint` event naming
    another place is refused, so no event line can make a row point at someone else's files."""
    if run.pipeline_id:
        return Run.objects.filter(pk=run.pipeline_id).values_list("run_dir", flat=True).first()
    return run.run_dir or None


def _record_checkpoint(run: Run, info: dict) -> Checkpoint:
    meta = info["meta"]
    checkpoint, _ = Checkpoint.objects.update_or_create(
        path=info["path"], step=info["step"],
        defaults={
            "run": run, "tokenizer": run.tokenizer, "stage": _stage(run),
            "model_config": meta.get("model_config") or {},
            "val_bpb": _number(meta.get("val_bpb")),
            "size_bytes": checkpoint_size(info["path"], info["step"]),
        },
    )  # fmt: skip
    return checkpoint


def _stage(run: Run) -> str:
    from runs.programs import PROGRAMS

    program = PROGRAMS.get(run.kind)
    if program and program.stage:
        return program.stage
    return run.kind if run.kind in Checkpoint.Stage.values else Checkpoint.Stage.BASE


def _record_eval_results(run: Run, results: list[dict], created: list[Checkpoint | None]) -> None:
    """An eval run scores its input checkpoint; any other run the checkpoint it just saved.

    For a training run that is the checkpoint saved before the result in this batch, else
    its latest stored one (None if it has saved none yet).
    """
    if not results:
        return
    latest = None
    if run.kind not in EVAL_KINDS:
        mine = [c.pk for c in created if c is not None]
        latest = run.checkpoints.exclude(pk__in=mine).order_by("-step").first()
    rows = []
    for result in results:
        fields = {k: v for k, v in result.items() if k != "checkpoint_index"}
        index = result.get("checkpoint_index", -1)
        if run.kind in EVAL_KINDS:
            target = run.parent_checkpoint
        else:
            target = created[index] if index >= 0 else latest
        rows.append(EvalResult(run=run, checkpoint=target, **fields))
    EvalResult.objects.bulk_create(rows)


def _run_updates(run: Run, parsed: Parsed) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if parsed.start:
        total = parsed.start.get("total_steps")
        if _count(total, _INT32) and total > 0:
            fields["total_steps"] = total
    if parsed.last_step is not None and parsed.last_step >= run.step:
        fields["step"] = parsed.last_step
    total = fields.get("total_steps") or run.total_steps
    if parsed.progress is not None:
        fields["progress"] = min(max(parsed.progress, 0.0), 1.0)
    elif parsed.last_step is not None and total:
        fields["progress"] = min(max(parsed.last_step / total, 0.0), 1.0)
    if parsed.eta is not None:
        fields["eta_seconds"] = max(parsed.eta, 0.0)
    if parsed.min_val_bpb is not None and (
        run.best_val_bpb is None or parsed.min_val_bpb < run.best_val_bpb
    ):
        fields["best_val_bpb"] = parsed.min_val_bpb
    return fields


def _update_artifacts(run: Run, parsed: Parsed) -> None:
    if parsed.dataset and run.dataset_id:
        limits = {"shards": _INT32, "documents": _INT64, "characters": _INT64,
                  "bytes_on_disk": _INT64}  # fmt: skip
        stats = {k: parsed.dataset.get(k) for k in limits}
        stats = {k: v for k, v in stats.items() if _count(v, limits[k])}
        if stats:
            Dataset.objects.filter(pk=run.dataset_id).update(**stats)
    if run.kind == Kind.TOKENIZER and run.tokenizer_id:
        updates: dict[str, Any] = {}
        vocab = (parsed.tokenizer or {}).get("vocab_size")
        if _count(vocab, _INT32) and vocab > 0:
            updates["vocab_size"] = vocab
        if parsed.eval_values:
            tokenizer = Tokenizer.objects.get(pk=run.tokenizer_id)
            updates["stats"] = {**tokenizer.stats, **parsed.eval_values}
        if updates:
            Tokenizer.objects.filter(pk=run.tokenizer_id).update(**updates)


def metrics_payload(parsed: Parsed, limit: int = 5000) -> dict[str, list] | None:
    """New points grouped by name for the live chart ({name: [[step, value, time], ...]}).

    A huge backlog (a page reconnecting after minutes) is not pushed point by point; the
    page refetches downsampled series instead (None means "refetch").
    """
    if len(parsed.metrics) > limit:
        return None
    series: dict[str, list] = {}
    for name, step, value, when in parsed.metrics:
        series.setdefault(name, []).append([step, value, when])
    return series
