"""Metric series for charts: read one run's points by name, downsampled for drawing.

A 50k-step run has 50k points per metric; a chart a thousand pixels wide needs about a
thousand. `downsample` keeps, per bucket of consecutive points, the lowest and the highest
value (so loss spikes and dips survive), plus the first and last point of the series.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from runs.models import MetricPoint

DEFAULT_MAX_POINTS = 1000
MAX_POINTS_LIMIT = 100_000


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
    return sorted(
        MetricPoint.objects.filter(run_id=run_id).values_list("name", flat=True).distinct()
    )


def series(
    run_id: int,
    names: Iterable[str],
    max_points: int = DEFAULT_MAX_POINTS,
    after_step: int | None = None,
) -> dict[str, dict[str, list]]:
    """{name: {"step": [...], "value": [...], "time": [...], "total": n}} per requested name."""
    result = {}
    for name in names:
        rows = MetricPoint.objects.filter(run_id=run_id, name=name)
        if after_step is not None:
            rows = rows.filter(step__gt=after_step)
        points = list(rows.order_by("step", "id").values_list("step", "value", "time"))
        if not points:
            result[name] = {"step": [], "value": [], "time": [], "total": 0}
            continue
        steps, values, times = zip(*points, strict=True)
        keep = downsample(steps, values, max_points)
        result[name] = {
            "step": [steps[i] for i in keep],
            "value": [values[i] for i in keep],
            "time": [times[i] for i in keep],
            "total": len(points),
        }
    return result
