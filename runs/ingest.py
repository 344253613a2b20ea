"""Turning a run's event-file lines into rows: metrics, checkpoints, samples, evals, reports.

`parse_events` is pure (events in, plain rows out) so it is tested without a database;
`apply` writes one batch in one transaction with bulk inserts, which is what keeps a
100k-point backlog to a few seconds (see runs/bench_ingest.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.db import transaction

from runs.models import (
    Checkpoint,
    Dataset,
    EvalResult,
    MetricPoint,
    Report,
    Run,
    RunEvent,
    Sample,
    Tokenizer,
)

BULK_BATCH = 2000
# Metrics a run's summary columns follow.
PROGRESS = "train/progress"
ETA = "train/eta_sec"
VAL_BPB = "val/bpb"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _int(value: Any, default: int = 0) -> int:
    return (
        int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default
    )


@dataclass
class Parsed:
    """Everything one batch of events adds, as plain data."""

    events: list[tuple[str, float, int | None, dict]] = field(default_factory=list)
    metrics: list[tuple[str, int, float | None, float]] = field(default_factory=list)
    checkpoints: list[dict] = field(default_factory=list)
    samples: list[tuple[int, str, str]] = field(default_factory=list)
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
        step = event.get("step")
        step = _int(step) if step is not None else None
        data = {k: v for k, v in event.items() if k not in ("type", "time")}
        out.events.append((str(kind)[:32], when, step, data))
        if kind in ("metrics", "eval"):
            values = event.get("values")
            if not isinstance(values, dict) or step is None:
                continue
            for name, value in values.items():
                number = _number(value)
                out.metrics.append((str(name)[:64], step, number, when))
                if kind == "eval":
                    if number is not None:
                        out.eval_values[str(name)] = number
                    if name == VAL_BPB and number is not None:
                        best = out.min_val_bpb
                        out.min_val_bpb = number if best is None else min(best, number)
            if kind == "metrics":
                out.last_step = step if out.last_step is None else max(out.last_step, step)
                out.progress = _number(values.get(PROGRESS)) or out.progress
                out.eta = _number(values.get(ETA))
        elif kind == "start":
            out.start = data
        elif kind == "end":
            out.end = data
        elif kind == "checkpoint" and step is not None and isinstance(event.get("path"), str):
            meta = event.get("meta") if isinstance(event.get("meta"), dict) else {}
            out.checkpoints.append({"step": step, "path": event["path"], "meta": meta})
        elif kind == "sample" and step is not None:
            out.samples.append(
                (step, str(event.get("prompt", "")), str(event.get("completion", "")))
            )
        elif kind == "eval_result" and isinstance(event.get("task"), str):
            details = event.get("details") if isinstance(event.get("details"), dict) else {}
            out.eval_results.append({
                "task": event["task"][:64], "metric": str(event.get("metric", "accuracy"))[:64],
                "value": _number(event.get("value")), "details": details,
            })  # fmt: skip
        elif kind == "report" and isinstance(event.get("markdown"), str):
            out.reports.append((str(event.get("section", "Report"))[:200], event["markdown"]))
        elif kind == "dataset":
            out.dataset = data
        elif kind == "tokenizer":
            out.tokenizer = data
    return out


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
        RunEvent.objects.bulk_create(
            [RunEvent(run=run, seq=seq0 + i, type=t, time=tm, step=s, data=d)
             for i, (t, tm, s, d) in enumerate(parsed.events)],
            batch_size=BULK_BATCH,
        )  # fmt: skip
        MetricPoint.objects.bulk_create(
            [MetricPoint(run=run, name=n, step=s, value=v, time=tm)
             for n, s, v, tm in parsed.metrics],
            batch_size=BULK_BATCH,
        )  # fmt: skip
        Sample.objects.bulk_create(
            [Sample(run=run, step=s, prompt=p, completion=c) for s, p, c in parsed.samples]
        )
        Report.objects.bulk_create(
            [Report(run=run, section=s, markdown=m) for s, m in parsed.reports]
        )
        for info in parsed.checkpoints:
            created.append(_record_checkpoint(run, info))
        if parsed.eval_results:
            # An eval run scores its input checkpoint; a training run its latest checkpoint.
            target = (run.parent_checkpoint or (created[-1] if created else None)
                      or run.checkpoints.order_by("-step").first())  # fmt: skip
            EvalResult.objects.bulk_create(
                [EvalResult(run=run, checkpoint=target, **r) for r in parsed.eval_results]
            )
        _update_artifacts(run, parsed)
        fields = _run_updates(run, parsed)
        run.events_offset = offset
        run.events_count = seq0 + len(parsed.events)
        Run.objects.filter(pk=run.pk).update(
            events_offset=offset, events_count=run.events_count, **fields
        )
        for name, value in fields.items():
            setattr(run, name, value)
    return created


def _record_checkpoint(run: Run, info: dict) -> Checkpoint:
    meta = info["meta"]
    stage = _stage(run)
    checkpoint, _ = Checkpoint.objects.update_or_create(
        path=info["path"], step=info["step"],
        defaults={
            "run": run, "tokenizer": run.tokenizer, "stage": stage,
            "model_config": meta.get("model_config") or {},
            "val_bpb": _number(meta.get("val_bpb")),
            "size_bytes": checkpoint_size(info["path"], info["step"]),
        },
    )  # fmt: skip
    return checkpoint


def _stage(run: Run) -> str:
    from runs.programs import PROGRAMS

    program = PROGRAMS.get(run.kind)
    return (program.stage if program and program.stage else None) or "base"


def _run_updates(run: Run, parsed: Parsed) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if parsed.start:
        total = parsed.start.get("total_steps")
        if isinstance(total, int) and total > 0:
            fields["total_steps"] = total
    if parsed.last_step is not None and parsed.last_step >= run.step:
        fields["step"] = parsed.last_step
    if parsed.progress is not None:
        fields["progress"] = min(max(parsed.progress, 0.0), 1.0)
    elif parsed.last_step is not None and (fields.get("total_steps") or run.total_steps):
        fields["progress"] = min(
            1.0, parsed.last_step / (fields.get("total_steps") or run.total_steps)
        )
    if parsed.eta is not None:
        fields["eta_seconds"] = parsed.eta
    if parsed.min_val_bpb is not None and (
        run.best_val_bpb is None or parsed.min_val_bpb < run.best_val_bpb
    ):
        fields["best_val_bpb"] = parsed.min_val_bpb
    return fields


def _update_artifacts(run: Run, parsed: Parsed) -> None:
    if parsed.dataset and run.dataset_id:
        stats = {k: parsed.dataset.get(k) for k in ("shards", "documents", "characters",
                                                    "bytes_on_disk")}  # fmt: skip
        Dataset.objects.filter(pk=run.dataset_id).update(
            **{k: v for k, v in stats.items() if isinstance(v, int)}
        )
    if run.kind == "tokenizer" and run.tokenizer_id:
        updates: dict[str, Any] = {}
        if parsed.tokenizer and isinstance(parsed.tokenizer.get("vocab_size"), int):
            updates["vocab_size"] = parsed.tokenizer["vocab_size"]
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
