"""Metric series for charts: read one run's points by name, downsampled for drawing.

A 50k-step run has 50k points per metric; a chart a thousand pixels wide needs about a
thousand. `downsample` keeps, per bucket of consecutive points, the lowest and the highest
value (so loss spikes and dips survive), plus the first and last point of the series.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable, Sequence
from contextlib import contextmanager

import numpy as np
from django.db import connections

from runs.models import MetricPoint

DEFAULT_MAX_POINTS = 1000
MAX_POINTS_LIMIT = 100_000
PREFERRED_METRICS = (
    "train/loss", "val/bpb", "train/lr_mult", "train/tok_per_sec", "train/mfu", "core",
    "train/reward", "train/lr",
)  # fmt: skip


def downsample(steps: Sequence[int], values: Sequence[float | None], max_points: int):
    """Indices to keep: ≤ max_points, always the first and the last, min and max per bucket."""
    n = len(steps)
    if max_points < 2:
        raise ValueError("max_points must be at least 2")
    if n <= max_points:
        return np.arange(n)
    vals = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    inner = np.arange(1, n - 1)
    buckets = (max_points - 2) // 2
    if buckets == 0:
        return np.array([0, n - 1])
    edges = np.linspace(0, len(inner), buckets + 1).astype(np.int64)
    keep = [0]
    # Nulls (NaN/inf reported by the program) are neither the minimum nor the maximum.
    lo_vals = np.where(np.isnan(vals), np.inf, vals)
    hi_vals = np.where(np.isnan(vals), -np.inf, vals)
    starts = edges[:-1]
    lengths = np.diff(edges)
    for start, length in zip(starts, lengths, strict=True):
        if length == 0:
            continue
        idx = inner[start : start + length]
        lo = idx[np.argmin(lo_vals[idx])]
        hi = idx[np.argmax(hi_vals[idx])]
        keep.extend(sorted({int(lo), int(hi)}))
    keep.append(n - 1)
    return np.array(keep)


def metric_names(run_id: int) -> list[str]:
    """The run's metric names, the usual ones first (the order chart pickers list them in)."""
    names = set(MetricPoint.objects.filter(run_id=run_id).values_list("name", flat=True).distinct())
    first = [n for n in PREFERRED_METRICS if n in names]
    return first + sorted(names - set(first))


def series(
    run_id: int,
    names: Iterable[str],
    max_points: int = DEFAULT_MAX_POINTS,
    after_step: int | None = None,
) -> dict[str, dict[str, list]]:
    """{name: {"step": [...], "value": [...], "time": [...], "total": n}} per requested name."""
    result = {}
    with _collector_paused():
        for name in names:
            result[name] = _series_of(run_id, name, max_points, after_step)
    return result


def _series_of(run_id: int, name: str, max_points: int, after_step: int | None) -> dict:
    rows = MetricPoint.objects.filter(run_id=run_id, name=name)
    if after_step is not None:
        rows = rows.filter(step__gt=after_step)
    points = _fetch(rows.order_by("step", "id").values_list("step", "value", "time"))
    if not points:
        return {"step": [], "value": [], "time": [], "total": 0}
    steps, values, times = zip(*points, strict=True)
    keep = downsample(steps, values, max_points).tolist()
    return {
        "step": [steps[i] for i in keep],
        "value": [values[i] for i in keep],
        "time": [times[i] for i in keep],
        "total": len(points),
    }


def _fetch(queryset) -> list[tuple]:
    """The rows as the database driver returns them, skipping the ORM's per-row conversions
    (a third of the time for a 50k-step series; python -m runs.bench_pages). Only for plain
    int and float columns."""
    sql, params = queryset.query.sql_with_params()
    with connections[queryset.db].cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall()


@contextmanager
def _collector_paused():
    """Pause the garbage collector while series are built: their hundreds of thousands of
    new tuples would trigger collections that scan them again and again (half the time of a
    long run's series), and tuples of numbers can never form a cycle for it to find."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
